"""The driver side of `towerlab train`: check everything that can be checked before a process starts, prepare the
data, open (or reopen) the MLflow run, start Ray, and run a TorchTrainer whose workers execute `loop.py`.

A run is named: <train.storage_path>/<name>/ holds Ray Train's checkpoints and towerlab_run.json (the MLflow run id).
Launching the same name again resumes from the latest checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from towerlab.config import ConfigError, Recipe, flatten, resolve_batch, to_dict, to_yaml
from towerlab.data import Manifest, prepare, read_manifest
from towerlab.tracking import MlflowRun, check_reachable, redact, resolve_uri
from towerlab.train.recipe import data_dir

RUN_FILE = "towerlab_run.json"


@dataclass
class Summary:
    run_id: str
    tracking_uri: str
    experiment: str
    metrics: dict = field(default_factory=dict)
    resumed: bool = False
    status: str = "FINISHED"


def ensure_data(recipe: Recipe) -> Manifest:
    """The run's prepared shards; built-in sources are prepared on first use."""
    path = data_dir(recipe)
    if recipe.data.source not in PREPARED and not (Path(path) / "manifest.json").exists():
        prepare(recipe.data.source, path, seed=0,
                size=recipe.data.synthetic_size if recipe.data.source.startswith("synthetic") else None)
    manifest = read_manifest(path, verify=True, bad_shards=recipe.data.bad_shards)
    check_prepared(recipe, manifest)
    plan = resolve_batch(recipe.data.global_batch, recipe.train.workers, recipe.data.micro_batch)
    per_worker = manifest.count("train") // plan.world_size
    if per_worker < plan.per_worker:
        raise ConfigError(f"data.global_batch={plan.global_batch} needs {plan.per_worker} training samples per "
                          f"worker per step but {path} gives each of {plan.world_size} workers only {per_worker}: "
                          "lower data.global_batch")
    return manifest


PREPARED = ("parquet", "webdataset")  # data.source values that read data.path as prepared by `towerlab data prepare`
MULTI_POSITIVE_LOSSES = ("decoupled_softmax", "sdm")  # losses that take several positives per image


def check_prepared(recipe: Recipe, manifest: Manifest) -> None:
    """What the recipe expects of a prepared dataset agrees with its manifest."""
    if recipe.data.source in PREPARED and manifest.shard_format != recipe.data.source:
        raise ConfigError(f"data.source={recipe.data.source} but {manifest.uri} holds {manifest.shard_format} shards: "
                          f"set data.source={manifest.shard_format}")
    if recipe.model.signal.dim and recipe.model.signal.dim != manifest.data.get("signal_dim"):
        raise ConfigError(f"model.signal.dim={recipe.model.signal.dim} but {manifest.uri} has "
                          + (f"signals of {manifest.data['signal_dim']} features: set model.signal.dim="
                             f"{manifest.data['signal_dim']}" if "signal_dim" in manifest.data else
                             "no 'signal' column: use data.source=synthetic3, or set model.signal.dim=0"))
    for name, ev in recipe.evals.items():
        if ev.type == "zeroshot" and ev.data in manifest.data["splits"] and not manifest.classes.get("prompts"):
            raise ConfigError(f"evals.{name} is a zero-shot evaluator but {manifest.uri} has no class labels: give the "
                              "recipe an `evals:` section without it (e.g. evals: {retrieval: {type: retrieval}}) "
                              "or prepare the data with a 'label' column in the captions file")
    if not manifest.data["counts"].get("heldout"):
        raise ConfigError(f"{manifest.uri} has no held-out records to evaluate on: prepare it again with --heldout "
                          "above 0 (e.g. 0.1)")
    for s in manifest.data.get("skipped", []):
        print(f"warning: skipping shard {s['file']} ({s['rows']} rows): {s['problem']} (data.bad_shards=skip)")


def captions_per_image(recipe: Recipe) -> int:
    """Captions per image in a training batch: data.captions_per_image for losses that take several positives,
    else one (chosen at random among the record's captions when data.augment.caption_choice is on)."""
    return recipe.data.captions_per_image if recipe.loss.name in MULTI_POSITIVE_LOSSES else 1


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("towerlab", "ray", "torch", "deepspeed", "mlflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}})
        return
    # address="local": always a new local instance, never a cluster some other process left running
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = api
    ray.init(address="local", num_cpus=max(min_cpus, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpus_needed(recipe: Recipe) -> int:
    return recipe.train.workers * recipe.train.cpus_per_worker + recipe.data.preprocess_concurrency


def ingest_config(recipe: Recipe):
    """Ray Train's DataConfig: Ray Data's defaults, with block order kept when the recipe asks for determinism.
    Call it before building the dataset: it also sets this process's DataContext, under which the driver reads
    (and, for small data, materializes) the shards in file order."""
    import ray.train
    from ray.data import DataContext

    if not recipe.data.deterministic:
        return ray.train.DataConfig()
    DataContext.get_current().execution_options.preserve_order = True
    return ray.train.DataConfig(execution_options=ray.train.DataConfig.default_ingest_options())


def root_cause(e: BaseException) -> str:
    """The innermost cause's type and last line: what a user needs to see of a failed run."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]


def train(recipe: Recipe, tracking_uri: str | None = None, parent_run_id: str | None = None,
          on_start: Callable[[Summary], None] | None = None, mlflow_name: str | None = None,
          tags: dict[str, str] | None = None, callbacks: Sequence = (), close_on_error: bool = True,
          mlflow_run_id: str | None = None, start_checkpoint: str | None = None) -> Summary:
    """Run `recipe` to completion (or resume it). In a sweep, `parent_run_id` nests the MLflow run, `mlflow_name`
    and `tags` describe the trial, and `callbacks` (Tune's report callback) go to the Ray Train run.

    `close_on_error=False` leaves a run that did not finish RUNNING for the caller to close: in a sweep only Tune
    knows whether a trial failed or was stopped early (which also makes its Train run raise), so the sweep driver
    is the one writer of that verdict.

    `mlflow_run_id` continues that MLflow run, and `start_checkpoint` (a Ray Train checkpoint directory) is where a
    run with no checkpoint of its own starts: population-based training hands a trial another trial's checkpoint."""
    plan = resolve_batch(recipe.data.global_batch, recipe.train.workers, recipe.data.micro_batch)
    from towerlab.train.plan import check_fits

    check_fits(recipe)  # refuses, with the numbers, what cannot fit the workers' memory
    uri = resolve_uri(recipe.tracking.uri, tracking_uri)
    check_reachable(uri)
    manifest = ensure_data(recipe)

    storage = Path(recipe.train.storage_path).absolute()
    run_dir = storage / recipe.name
    run_file = run_dir / RUN_FILE
    resumed = run_file.exists() or mlflow_run_id is not None
    if resumed:
        run = MlflowRun(uri, mlflow_run_id or json.loads(run_file.read_text())["mlflow_run_id"])
        run.reopen()
    else:
        params = flatten(to_dict(recipe))
        params["batch.accumulation"] = plan.accumulation
        params["batch.micro_batch"] = plan.micro_batch
        all_tags = {"towerlab.git_commit": git_commit(), "towerlab.data_fingerprint": manifest.fingerprint,
                "towerlab.data_source": recipe.data.source, "towerlab.run_name": recipe.name,
                "towerlab.batch_plan": plan.describe()}
        if manifest.data.get("skipped"):
            all_tags["towerlab.data_skipped_shards"] = ",".join(x["file"] for x in manifest.data["skipped"])
        all_tags.update({f"towerlab.version.{k}": v for k, v in versions().items()})
        all_tags.update(tags or {})
        run = MlflowRun.start(uri, recipe.tracking.experiment, mlflow_name or recipe.name, params, all_tags,
                              parent_run_id)
        run.log_text(to_yaml(recipe), "recipe.yaml")
        run.log_text(json.dumps(manifest.data["counts"] | {"fingerprint": manifest.fingerprint}), "data.json")
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mlflow_run_id": run.run_id, "tracking_uri": redact(uri)}))
        os.replace(tmp, run_file)
    summary = Summary(run.run_id, uri, recipe.tracking.experiment, resumed=resumed)
    if on_start:
        on_start(summary)

    status = "FAILED"
    try:
        import ray.train
        from ray.train.torch import TorchTrainer

        from towerlab.data.pipeline import train_dataset
        from towerlab.train.loop import train_loop_per_worker

        allocator_env(recipe)
        init_ray(cpus_needed(recipe))
        # Ray Train's controller polls its workers every 2 s by default, and a run's end takes a few polls: about
        # 4 s of idle tail per run (per trial, in a sweep). Polling every 0.5 s costs nothing measurable. Read by
        # the controller, to which Ray Train passes this variable on; a value set by the user wins.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        data_config = ingest_config(recipe)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"recipe": recipe, "tracking_uri": uri, "run_id": run.run_id,
                               "data_dir": manifest.uri, "start_checkpoint": start_checkpoint},
            scaling_config=ray.train.ScalingConfig(
                num_workers=recipe.train.workers, use_gpu=recipe.train.use_gpu,
                resources_per_worker={"CPU": recipe.train.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=recipe.name, storage_path=str(storage),
                failure_config=ray.train.FailureConfig(max_failures=recipe.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints),
                callbacks=list(callbacks)),
            datasets={"train": train_dataset(recipe, manifest, captions_per_image(recipe))},
            dataset_config=data_config,
        )
        result = trainer.fit()
        summary.metrics = dict(result.metrics or {})
        if recipe.train.export_fp32 and result.checkpoint is not None:
            from towerlab.train.loop import CKPT_TAG
            from towerlab.train.zero import export_fp32

            export_fp32(result.checkpoint, CKPT_TAG, run)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        # not when a sweep already closed it KILLED (it stopped the trial), nor over the workers' own diagnosis
        if (close_on_error or run.status() == "RUNNING") and "towerlab.failure" not in run.tags():
            run.set_tags({"towerlab.failure": root_cause(e)})
        raise
    finally:
        if close_on_error or status == "FINISHED":
            run.end(status)
        summary.status = status
    return summary
