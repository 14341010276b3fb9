"""The Ray environment of a run: connecting to a cluster or starting a local Ray (with its dashboard, for the State
and Jobs APIs), the CPUs a run needs, Ray Train's data-ingest settings, and the allocator setting ZeRO-3 needs on CPU
workers. Everything here runs on the driver, before the TorchTrainer starts."""

from __future__ import annotations

import logging
import os

from towerlab.config import Recipe
from towerlab.util import VERBOSE_ENV, free_port, verbose

MMAP_THRESHOLD = "131072"  # bytes: glibc's own starting value, fixed (see allocator_env)


def allocator_env(recipe: Recipe) -> None:
    """ZeRO-3 on CPU workers, on a local Ray that towerlab starts: fix glibc's mmap threshold at 128 KiB (unless the
    user set it), so every large tensor goes back to the system when freed. glibc's adaptive default keeps the
    parameters ZeRO-3 gathers and frees in a fragmented heap: on 2 CPU workers (151M parameters) ZeRO-3 measured
    1.02x ZeRO-0's peak per worker without it and 0.61x with it, at 1.8x the step time (fresh pages from the kernel
    each step; benchmarks/zero_memory.py, --glibc-default); a 1.37B run was OOM-killed without it. glibc reads it
    when a process starts, so it is set before Ray starts and every Ray process inherits it; a running cluster
    needs it in the environment of `ray start`."""
    if recipe.train.zero_stage == 3 and not recipe.train.use_gpu and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)


def init_ray(min_cpus: int) -> None:
    """Connect to RAY_ADDRESS when set; else start a local Ray with its dashboard (State and Jobs APIs) on
    127.0.0.1. Locally, one logical CPU more than the workers take is declared so Ray Data's preprocessing tasks
    always have a slot (with every CPU held by training workers, the pipeline would wait forever).

    Ray's State API client, which Ray Train's placement-group cleaner uses inside the cluster, finds its server
    through RAY_ADDRESS or else the latest Ray started on the machine, which need not be ours (a second local run, a
    test cluster): RAY_API_SERVER_ADDRESS pins it, in this process and in every task and actor of this job."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        from ray.dashboard.utils import get_address_for_submission_client

        api = os.environ.get("RAY_API_SERVER_ADDRESS") or get_address_for_submission_client(address)
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        ray.init(address=address, **_console(api))
        return
    # address="local": always a new local instance, never a cluster some other process left running
    # Ray Train's preemption watcher (one more actor process per worker group, so per sweep trial) polls for nodes
    # being drained, which happens to autoscaled cloud nodes, never to the one node of a Ray started here; read from
    # the environment the local Ray inherits, a value set by the user wins
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = api
    ray.init(address="local", num_cpus=max(min_cpus, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port, **_console(api))


def _console(api: str) -> dict:
    """ray.init's arguments for the console: quiet by default (no worker logs streamed, Ray's own INFO lines off;
    the workers write theirs under the run directory), everything with `-v`. The job's env vars reach every task and
    actor, so a sweep's trials know too."""
    loud = verbose()
    env = {"RAY_API_SERVER_ADDRESS": api, **({VERBOSE_ENV: "1"} if loud else {})}
    return {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING,
            "runtime_env": {"env_vars": env}}


def cpus_needed(recipe: Recipe) -> int:
    return recipe.train.workers * recipe.train.cpus_per_worker + recipe.data.preprocess_concurrency


def ingest_config(recipe: Recipe):
    """Ray Train's DataConfig: Ray Data's defaults, with block order kept when the recipe asks for determinism.
    Call it before building the dataset: it also sets this process's DataContext, under which the driver reads
    (and, for small data, materializes) the shards in file order."""
    import ray.train
    from ray.data import DataContext

    # Ray Data's progress bars (a few hundred lines per run, from the split coordinator) only with -v
    DataContext.get_current().enable_progress_bars = verbose()
    if not recipe.data.deterministic:
        return ray.train.DataConfig()
    DataContext.get_current().execution_options.preserve_order = True
    return ray.train.DataConfig(execution_options=ray.train.DataConfig.default_ingest_options())
