"""The driver side of `towerlab train`: check everything that can be checked before a process starts, prepare the
data, open (or reopen) the MLflow run, start Ray, and run a TorchTrainer whose workers execute `loop.py`.

A run is named: <train.storage_path>/<name>/ holds Ray Train's checkpoints and towerlab_run.json (the MLflow run id).
Launching the same name again resumes from the latest checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from towerlab.config import ConfigError, Recipe, flatten, resolve_batch, to_dict
from towerlab.config.secrets import redact_params, redacted_yaml
from towerlab.tracking import MlflowRun, check_reachable, redact, resolve_uri, stop, tags as T
from towerlab.tracking.dataset_input import log_training_dataset
from towerlab.tracking.heartbeat import Heartbeat, close_dead, is_stale, last_beat
from towerlab.tracking.provenance import git_commit, versions
from towerlab.train.checkpoint import RUN_FILE, checkpoint_samples, latest_checkpoint, resume_differences
from towerlab.train.dataset import captions_per_image, ensure_data, prompt_unknown_share
from towerlab.train.evaluate import check_eval_data
from towerlab.train.memory import check_fits
from towerlab.train.preconditions import check_preconditions
from towerlab.train.ray_env import allocator_env, cpus_needed, ingest_config, init_ray
from towerlab.train.startup import Timeline
from towerlab.data.location import is_uri
from towerlab.util import CONSOLE_FILE, atomic_write, verbose


@dataclass
class Summary:
    """What `train` hands back (and to `on_start` once the MLflow run exists): the run, where it is tracked, its
    last reported metrics and how it ended."""
    run_id: str
    tracking_uri: str
    experiment: str
    metrics: dict = field(default_factory=dict)
    resumed: bool = False
    status: str = "FINISHED"
    models: dict = field(default_factory=dict)  # role (last, best) -> MLflow LoggedModel id
    logs: str | None = None  # where the workers' output went, when not streamed to the console


def root_cause(e: BaseException) -> str:
    """The innermost cause's type and message: what a user needs to see of a failed run. Ray wraps a worker's
    error in a WorkerGroupError (per rank, in worker_failures) and a task's in a RayTaskError (the error itself in
    .cause), whose text ends with Ray's own advice rather than the error."""
    for _ in range(32):  # a chain, not a cycle
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            e = failures[min(failures)]
        elif isinstance(getattr(e, "cause", None), BaseException):
            e = e.cause
        elif e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    text = str(e).strip().splitlines() or [""]
    # the error's own first line: Ray Data appends its retry advice to the message of an error raised in a task,
    # and an unwrapped Ray error's text is a traceback whose last line is the error
    ray_text = type(e).__module__.startswith("ray.")
    return f"{type(e).__name__}: {text[-1] if ray_text else text[0]}"[:500]


def _check_storage(storage_path: str) -> None:
    """A local storage_path that is (or lies under) a file cannot hold run directories: refused before data is
    prepared and an MLflow run is created."""
    if "://" in storage_path:
        return
    p = Path(storage_path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"train.storage_path={storage_path}: {p} is a file, not a directory: point it at a "
                          "directory (default: results)")


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
    timeline = Timeline()  # start-up marks (train/startup.py), finished and logged by rank 0
    plan = resolve_batch(recipe.data.global_batch, recipe.train.workers, recipe.data.micro_batch)
    check_fits(recipe)  # refuses, with the numbers, what cannot fit the workers' memory
    check_preconditions(recipe)  # libaio for nvme offload, a GPU for use_gpu, bf16 support
    _check_storage(recipe.train.storage_path)
    uri = resolve_uri(recipe.tracking.uri, tracking_uri)
    check_reachable(uri)
    manifest = ensure_data(recipe)
    check_eval_data(recipe, manifest)
    timeline.mark("checks")

    storage = Path(recipe.train.storage_path).absolute()
    run_dir = storage / recipe.name
    run_file = run_dir / RUN_FILE
    resumed = run_file.exists() or mlflow_run_id is not None
    if resumed:
        # every refusal comes before reopening: a FINISHED run is never turned FAILED by a resume that cannot happen
        run = MlflowRun(uri, mlflow_run_id or _recorded_run_id(run_file))
        _check_resumable(run, recipe, uri, run_dir, own=mlflow_run_id is None)
        run.reopen()
    else:
        params = redact_params(flatten(to_dict(recipe)))  # no credential reaches MLflow (config/secrets.py)
        params["batch.accumulation"] = plan.accumulation
        params["batch.micro_batch"] = plan.micro_batch
        all_tags = {T.GIT_COMMIT: git_commit(), T.DATA_FINGERPRINT: manifest.fingerprint,
                    T.DATA_SOURCE: recipe.data.source, T.RUN_NAME: recipe.name, T.BATCH_PLAN: plan.describe()}
        if manifest.skipped:
            all_tags[T.DATA_SKIPPED_SHARDS] = ",".join(x["file"] for x in manifest.skipped)
        all_tags.update({f"{T.VERSION_PREFIX}{k}": v for k, v in versions().items()})
        all_tags.update(tags or {})
        # start() ends the run FAILED itself when MLflow refuses its params
        run = MlflowRun.start(uri, recipe.tracking.experiment, mlflow_name or recipe.name, params, all_tags,
                              parent_run_id)
    summary = Summary(run.run_id, uri, recipe.tracking.experiment, resumed=resumed,
                      logs=worker_log_dir(recipe, run_dir))

    # From here to the end, every way out ends the run: FINISHED, FAILED with the reason, KILLED on a stop signal.
    status = "FAILED"
    heartbeat = Heartbeat(run.client, run.run_id).start()
    try:
        if not resumed:
            run.log_text(redacted_yaml(recipe), "recipe.yaml")
            described = {k: manifest.data[k] for k in ("count_source", "fingerprint_of", "keys") if k in manifest.data}
            run.log_text(json.dumps(manifest.counts | {"fingerprint": manifest.fingerprint} | described),
                         "data.json")
            if recipe.data.sources:  # the mixture: each corpus (credentials redacted), its weight, share and count
                run.log_text(json.dumps(manifest.data["sources"], indent=1), "data_mixture.json")
            # the same identity as a dataset input: the MLflow UI shows it in the run list's Datasets column
            log_training_dataset(run.client, run.run_id, recipe.data.source, manifest)
            unknown = prompt_unknown_share(recipe, manifest)
            if unknown is not None:
                run.log_metrics({"data/prompt_unknown_share": unknown}, 0)
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(run_file, json.dumps({"mlflow_run_id": run.run_id, "tracking_uri": redact(uri)}))
            except OSError as e:
                raise ConfigError(f"train.storage_path={recipe.train.storage_path}: cannot hold the run directory "
                                  f"{run_dir} ({e.strerror or e}): point it at a directory") from None
        timeline.mark("mlflow")
        if on_start:
            on_start(summary)

        import ray.train

        from towerlab.data.pipeline import train_dataset
        from towerlab.train.loop import train_loop_per_worker

        allocator_env(recipe)
        init_ray(cpus_needed(recipe))
        stop.reinstall()  # ray.init replaced the CLI's SIGTERM handler with one that calls sys.exit
        timeline.mark("ray")
        # Ray Train's controller polls its workers every 2 s by default, and a run's end takes a few polls: about
        # 4 s of idle tail per run (per trial, in a sweep). Polling every 0.5 s costs nothing measurable. Read by
        # the controller, to which Ray Train passes this variable on; a value set by the user wins.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        data_config = ingest_config(recipe)
        # a resumed run's data starts where the checkpoint it resumes from stopped: its own latest, else PBT's
        own = None
        if resumed:
            with contextlib.suppress(ConfigError):  # resumed before its first checkpoint
                own = latest_checkpoint(run_dir)
        data = train_dataset(recipe, manifest, captions_per_image(recipe),
                             start=checkpoint_samples(own or start_checkpoint))
        timeline.mark("dataset")
        trainer = _Trainer(
            train_loop_per_worker,
            train_loop_config={"recipe": recipe, "tracking_uri": uri, "run_id": run.run_id,
                               "data_dir": manifest.uri, "start_checkpoint": start_checkpoint,
                               "log_dir": summary.logs,
                               # foreign shards have no manifest.json for the workers to read: send the listing
                               "manifest": manifest if manifest.foreign else None,
                               "startup": (timeline.t0, timeline.marks),
                               "epoch_samples": data.epoch_samples, "start_samples": data.start},
            scaling_config=ray.train.ScalingConfig(
                num_workers=recipe.train.workers, use_gpu=recipe.train.use_gpu,
                resources_per_worker={"CPU": recipe.train.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=recipe.name, storage_path=str(storage),
                failure_config=ray.train.FailureConfig(max_failures=recipe.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints),
                callbacks=list(callbacks)),
            datasets={"train": data.dataset},
            dataset_config=data_config,
        )
        if manifest.skipped:  # shards found unreadable while building the dataset (data.bad_shards=skip)
            run.set_tags({T.DATA_SKIPPED_SHARDS: ",".join(x["file"] for x in manifest.skipped)})
        with echo_console(summary.logs):
            result = trainer.fit()
        summary.metrics = dict(result.metrics or {})
        if recipe.train.export_fp32 and result.checkpoint is not None:
            from towerlab.train.checkpoint import export_fp32

            export_fp32(result.checkpoint, run)
        if recipe.tracking.log_models and result.checkpoint is not None:
            summary.models = _log_models(recipe, run_dir, uri, run)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # a stop signal (SystemExit: Ray's own SIGTERM handler)
        status = "KILLED"
        raise
    except Exception as e:
        # not when a sweep already closed it KILLED (it stopped the trial), nor over the workers' own diagnosis;
        # and a store that fails here must not hide `e`
        try:
            if (close_on_error or run.status() == "RUNNING") and T.FAILURE not in run.tags():
                run.set_tags({T.FAILURE: root_cause(e)})
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        heartbeat.stop()
        summary.status = status
        if close_on_error or status == "FINISHED":
            _end(run, status)
    return summary


def _end(run: MlflowRun, status: str) -> None:
    """End the run; when the store does not answer, say so (the heartbeat has stopped: `towerlab runs doctor --fix`
    closes it later) rather than replace the error on its way out."""
    try:
        run.end(status)
    except Exception as e:  # noqa: BLE001
        if status == "FINISHED":
            raise
        print(f"warning: could not end MLflow run {run.run_id} {status} ({type(e).__name__}); `towerlab runs doctor "
              "--fix` closes it once its heartbeat is stale", file=sys.stderr)


@contextlib.contextmanager
def echo_console(log_dir: str | None, every_s: float = 0.5):
    """While the workers run, echo on this process's stderr the lines they meant for the user's console
    (towerlab.util.say: an MLflow outage, a skipped shard), which their output file would otherwise hide."""
    if not log_dir:
        yield
        return
    import threading

    path, stop = Path(log_dir) / CONSOLE_FILE, threading.Event()
    offset = [path.stat().st_size if path.is_file() else 0]  # a resumed run: what its earlier launch said is said

    def drain() -> None:
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                f.seek(offset[0])
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]  # complete lines only: the rest is still being written
            offset[0] += len(whole)
            if whole:
                sys.stderr.write(whole.decode("utf-8", "replace"))
                sys.stderr.flush()

    def loop() -> None:
        while not stop.wait(every_s):
            drain()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        drain()


def worker_log_dir(recipe: Recipe, run_dir: Path) -> str | None:
    """Where the workers write their output when it is not streamed to the console (`-v` streams it): <run
    dir>/logs, on local storage; None with -v, or when the run directory is a URI (Ray keeps the logs then)."""
    if verbose() or is_uri(recipe.train.storage_path):
        return None
    return str(run_dir / "logs")


def best_metric(recipe: Recipe) -> str | None:
    """The metric that picks a run's best checkpoint: tracking.best_metric, else top1 of the first zeroshot
    evaluator."""
    if recipe.tracking.best_metric:
        return recipe.tracking.best_metric
    return next((f"eval/{name}/top1" for name, e in recipe.evals.items() if e.type == "zeroshot"), None)


def _log_models(recipe: Recipe, run_dir: Path, uri: str, run: MlflowRun) -> dict[str, str]:
    """The last and the best checkpoint as MLflow LoggedModels. The training itself succeeded: a model that has no
    counterpart in an exchange format, or a store that refuses the upload, is a warning, not a failed run. What the
    logged models lack (the export's notes, e.g. a word vocabulary OpenCLIP has no tokenizer for) is a tag on the
    run, not a console line on every run of such a recipe."""
    from towerlab.train.export import log_run_models

    def warn(line: str) -> None:
        print(line if line.startswith("warning:") else f"warning: {line}", file=sys.stderr)

    notes: list[str] = []
    try:
        ids = log_run_models(run_dir, uri, best_metric(recipe), recipe.tracking.best_mode, warn=notes.append)
    except ConfigError as e:
        warn(f"the run's models are not logged to MLflow: {e}")
        return {}
    except Exception as e:  # noqa: BLE001
        warn(f"the run's models are not logged to MLflow ({root_cause(e)}); `towerlab export {run_dir} --format hf "
             "--out DIR --register NAME` logs one later")
        return {}
    if notes:
        run.set_tags({T.MODELS_NOTE: " | ".join(dict.fromkeys(n.removeprefix("warning: ") for n in notes))[:5000]})
    return ids


def _recorded_run_id(run_file: Path) -> str:
    try:
        return json.loads(run_file.read_text())["mlflow_run_id"]
    except (ValueError, KeyError, TypeError, OSError):
        raise ConfigError(f"{run_file} is not a towerlab run file (no mlflow_run_id): delete {run_file.parent} "
                          "to start the run afresh, or launch with a new name=") from None


def _check_resumable(run: MlflowRun, recipe: Recipe, uri: str, run_dir: Path, own: bool) -> None:
    """Refuse, in one line, a resume that cannot happen: the run file names a run the store does not have (another
    store, or a deleted run), or the recipe changes what the checkpoint holds. `own`: the run is this name's (not a
    sweep's hand-over), so a dead driver's run is closed FAILED with the reason before it is reopened."""
    from mlflow.exceptions import MlflowException

    fresh = f"to start fresh, launch with a new name= or delete {run_dir}"
    try:
        info = run.client.get_run(run.run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        recorded = ""
        if own:
            with contextlib.suppress(ValueError, OSError):
                was = json.loads((run_dir / RUN_FILE).read_text()).get("tracking_uri")
                recorded = f", recorded in {was}" if was and was != redact(uri) else ""
        raise ConfigError(f"{run_dir / RUN_FILE} resumes MLflow run {run.run_id}{recorded}, which the tracking "
                          f"store {redact(uri)} does not have: use that store (--tracking-uri), or {fresh}") from None
    if info.info.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow run {run.run_id} of '{recipe.name}' is deleted in {redact(uri)}: restore it "
                          f"(`mlflow runs restore`), or {fresh}")
    ckpt, diffs = resume_differences(run_dir, recipe)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConfigError(f"run '{recipe.name}' cannot resume from {ckpt}: the recipe changes what the checkpoint "
                          f"holds ({shown}): {fresh}")
    if own and is_stale(info):
        close_dead(run.client, run.run_id, last_beat(info))


class _Trainer:
    """TorchTrainer, without the SIGINT handler Ray Train installs in `fit` (it aborts the run and returns as if it
    had failed): Ctrl-C raises KeyboardInterrupt here like SIGTERM, and the driver ends the run KILLED."""

    def __new__(cls, *args, **kwargs):
        from ray.train.torch import TorchTrainer

        class Trainer(TorchTrainer):
            def _register_sigint_handler(self, controller) -> None:  # Ray Train V2's hook (private): not ours
                if not stop.installed():
                    super()._register_sigint_handler(controller)

        return Trainer(*args, **kwargs)
