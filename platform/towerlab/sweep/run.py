"""Running a sweep: one Ray Tune function trial per configuration, each running one Ray Train run (TorchTrainer
inside the trial, reporting through Tune's TuneReportCallback: the Ray Train V2 pattern).

MLflow: the driver opens one parent run per sweep (the sweep file as artifact, the search space as params); every
trial opens a child run nested under it (via `train`). A Tune callback on the driver closes what a trial could not:
a trial stopped early by ASHA is killed with its Train run, so its child is marked KILLED; a trial that errored
before its run ended is marked FAILED. At the end the parent records the best trial and its config.

State lives under <storage_path>/<name>/: Tune's experiment state, towerlab_sweep.json (the parent run id; written
once Tune has started, and removed again when a first start ends before Tune saved any state, so the name stays
free), and trials/<trial>/ (each trial's Ray Train checkpoints). `--resume NAME` restores Tune from there: finished
trials are not rerun, unfinished ones resume from their latest Train checkpoint into their same child run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from towerlab.config import ConfigError, to_dict
from towerlab.config.secrets import redact_params, redact_text, redacted_yaml
from towerlab.sweep.schema import SweepConfig
from towerlab.sweep.space import SEED_KEY, replicated_space, trial_config
from towerlab.tracking import MlflowRun, check_reachable, redact, resolve_uri, stop, tags as T
from towerlab.tracking.heartbeat import Heartbeat, close_dead, is_stale, last_beat
from towerlab.util import atomic_write

STATE_FILE = "towerlab_sweep.json"
TRIAL_TAG = T.TRIAL_ID


@dataclass
class SweepSummary:
    name: str
    parent_run_id: str
    tracking_uri: str
    best_config: dict
    best_metric: float | None
    trials: int
    errors: int


# The recipe keys every trial's run name starts with (whether swept or not), each with its label; the other swept
# keys follow as LEAF=value.
RUN_NAME_KEYS = (("loss.name", ""), ("loss.temperature_init", "t="), ("data.global_batch", "b="))


def trial_run_name(config: dict, recipe) -> str:
    """A run name that says what the trial is: loss, temperature, batch, then the other swept keys."""
    def value(key: str) -> str:
        v = functools.reduce(getattr, key.split("."), recipe)
        return f"{v:g}" if isinstance(v, float) else str(v)

    head = [label + value(key) for key, label in RUN_NAME_KEYS]
    shown = {key for key, _ in RUN_NAME_KEYS}
    return " ".join(head + [f"{k.split('.')[-1]}={v}" for k, v in sorted(config.items()) if k not in shown])


def run_trial(config: dict, ctx: dict) -> None:
    """The Tune function trial: resolve the trial's recipe and train it (a TorchTrainer inside this trial)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Empty, Queue

    from towerlab.train.driver import train
    from towerlab.train.recipe import load_recipe

    config = trial_config(config)
    trial_id = tune.get_context().get_trial_id()
    name = f"{ctx['name']}-{trial_id}"
    start = tune.get_checkpoint() if ctx["pbt"] else None
    if start is not None:
        # a new Train run per checkpoint handed over: under its old name Ray Train would resume its own latest one
        name += "-" + hashlib.sha1(start.path.encode()).hexdigest()[:8]
    overrides = [*ctx["overrides"], *(f"{k}={v}" for k, v in config.items()), f"name={name}",
                 f"train.storage_path={ctx['trials_dir']}"]
    recipe = load_recipe(ctx["recipe"], overrides)
    kwargs = dict(tracking_uri=ctx["tracking_uri"], parent_run_id=ctx["parent_run_id"],
                  mlflow_name=trial_run_name(config, recipe),
                  tags={TRIAL_TAG: trial_id, T.SWEEP: ctx["name"], T.ROLE: "trial", T.SEED: str(recipe.seed),
                        T.CONFIG: trial_run_name({k: v for k, v in config.items() if k != SEED_KEY}, recipe)},
                  close_on_error=False)
    if not ctx["pbt"]:
        train(recipe, callbacks=[TuneReportCallback()], **kwargs)
        return
    # PBT: Tune must hold the trial's checkpoints to hand them to other trials, so every Train report (with its
    # checkpoint) is forwarded to tune.report from this thread while the TorchTrainer runs in another
    if start is not None:
        # a copy of our own: the trial that made it goes on and deletes its older checkpoints (num_to_keep)
        own = Path(ctx["trials_dir"]) / f"{name}-start"
        if not own.exists():
            start.to_directory(str(own))
        kwargs |= {"mlflow_run_id": _trial_run_id(ctx, trial_id), "start_checkpoint": str(own)}
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    done, failure = threading.Event(), []

    def fit() -> None:
        try:
            train(recipe, callbacks=[_report_with_checkpoint(queue)], **kwargs)
        except BaseException as e:  # re-raised in the trial's thread below
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=fit, daemon=True, name="towerlab-trial-fit").start()
    while True:
        try:
            metrics, path = queue.get(timeout=1.0)
        except Empty:
            if done.is_set():
                break
            continue
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(path) if path else None)
    if failure:
        raise failure[0]


def _report_with_checkpoint(queue):
    """A Ray Train callback (it runs in the Train controller) that passes rank 0's metrics and the checkpoint's path
    to the trial through `queue`; Tune's own TuneReportCallback forwards metrics only."""
    from ray.train import UserCallback

    class ReportWithCheckpoint(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put((dict(metrics[0]), checkpoint.path if checkpoint else None))

    return ReportWithCheckpoint()


def _trial_runs(client, parent_run_id: str, trial_id: str) -> list:
    """The MLflow child runs of one trial under the sweep's parent run (one, unless a run was restarted)."""
    return client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _trial_run_id(ctx: dict, trial_id: str) -> str | None:
    """The trial's MLflow child run, to continue across PBT hand-overs (None before its first start)."""
    from mlflow import MlflowClient

    runs = _trial_runs(MlflowClient(ctx["tracking_uri"]), ctx["parent_run_id"], trial_id)
    return runs[0].info.run_id if runs else None


def _mlflow_callback(uri: str, parent_run_id: str):
    from mlflow import MlflowClient
    from ray.tune import Callback

    class CloseChildRuns(Callback):
        """Marks a trial's child run KILLED (stopped early) or FAILED (errored) when it is left RUNNING."""

        def _close(self, trial, status: str, unless: tuple[str, ...], reason: str | None = None) -> None:
            client = MlflowClient(uri)
            for r in _trial_runs(client, parent_run_id, trial.trial_id):
                if r.info.status not in unless:
                    failure = r.data.tags.get(T.FAILURE)
                    if reason is None and failure:  # stopped, not failed: the workers' death was ours
                        client.delete_tag(r.info.run_id, T.FAILURE)
                    elif reason and not failure:  # the workers' or the trial's own diagnosis is better
                        client.set_tag(r.info.run_id, T.FAILURE, reason[:500])
                    client.set_terminated(r.info.run_id, status=status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # Tune's verdict wins: a trial it completed without error either finished (its run says FINISHED) or
            # was stopped early, which kills its Train run; the trial leaves the run RUNNING (close_on_error=False)
            # so this is the one place that closes it: KILLED.
            self._close(trial, "KILLED", unless=("FINISHED",))

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = str(getattr(trial, "error_msg", None) or "trial errored").strip().splitlines()
            self._close(trial, "FAILED", unless=("FINISHED", "FAILED"), reason=reason[-1] if reason else None)

    return CloseChildRuns()


def check_state_api(wait_s: float = 90.0) -> None:
    """Ray Train frees a stopped trial's workers through the State API (served by the dashboard): without it an
    ASHA sweep hangs after the first early stop. Refuse to start when it does not answer within `wait_s`: a
    dashboard just started on a busy machine can take a while to come up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            from ray.util.state import list_actors

            list_actors(limit=1, raise_on_missing_output=False, timeout=15)
            return
        except Exception as e:  # ImportError (no ray[default]) or a connection error (not up yet, or never)
            if isinstance(e, ImportError) or time.monotonic() > deadline:
                raise ConfigError(
                    f"Ray's State API does not answer ({type(e).__name__}): a stopped trial's workers could never be "
                    "freed. Install ray[default] on every node (the dashboard serves the State API) and do not "
                    "start Ray with --include-dashboard=false") from None
            time.sleep(3)


def sweep_dir(sweep: SweepConfig) -> Path:
    return Path(sweep.storage_path).absolute() / sweep.name


def run_sweep(sweep: SweepConfig, sweep_file: str | os.PathLike, tracking_uri: str | None = None,
              resume: bool = False, retry_failed: bool = False, extend: int = 0) -> SweepSummary:
    """Run (or with `resume`, continue) a validated sweep to its end and return its summary. With `resume`,
    `retry_failed` reruns the trials that failed (each continues its MLflow child run and its latest checkpoint), and
    `extend` K trains every configuration the sweep ran with K more seeds (a new Tune experiment under the sweep's
    directory, nested under the same parent run).

    Checks the tracking store, then opens the MLflow parent run (or reopens the one recorded in the sweep's state
    file), starts or joins Ray (its State API must answer: Ray Train frees stopped trials' workers through it), and
    runs a Tune function trial per configuration and seed: each trial calls train/driver.py's `train` with the
    sampled overrides, nested under the parent. The state file is written when Tune sets up the experiment. The
    parent ends FINISHED with the best trial's metric and config, or FAILED/KILLED when the sweep itself fails or is
    interrupted."""
    from ray import tune

    from towerlab.sweep.load import recipe_path, trial_plan
    from towerlab.train.ray_env import init_ray

    uri = resolve_uri(sweep.tracking.uri, tracking_uri)
    check_reachable(uri)
    root = sweep_dir(sweep)
    state_file = root / STATE_FILE
    plan = trial_plan(sweep, sweep_file) if not resume or extend else None  # integer keys, ASHA's max_t, the seed
    if resume:
        if not state_file.exists():
            raise ConfigError(f"no sweep '{sweep.name}' to resume under {root.parent}: start it with "
                              "`towerlab sweep SWEEP.yaml`")
        state = read_state(state_file)
        experiments = [root / e for e in state.get("experiments", ["."])]
        if not all(map(tune_resumable, experiments)):
            raise ConfigError(f"sweep '{sweep.name}' has no Ray Tune state under {root} to resume (its first start "
                              f"ended before Tune saved any): start it anew after removing {state_file}, or set "
                              "name=... for a new sweep")
        parent = MlflowRun(uri, state["parent_run_id"])
        _check_parent(parent, uri, sweep, root)  # before reopening: a refused resume changes nothing
        parent.reopen()
    else:
        if state_file.exists():
            raise ConfigError(f"sweep '{sweep.name}' already exists under {root.parent}: continue it with "
                              f"`towerlab sweep --resume {sweep.name}`, or set name=... for a new sweep")
        params = {f"space.{k}": json.dumps(v) for k, v in sweep.space.items()}
        params.update({"metric": sweep.metric, "mode": sweep.mode, "search.algorithm": sweep.search.algorithm,
                       "search.num_samples": sweep.search.num_samples, "search.seeds": sweep.search.seeds,
                       "scheduler.name": sweep.scheduler.name, "scheduler.time": sweep.scheduler.time,
                       "recipe": sweep.recipe, "workers_per_trial": sweep.workers_per_trial})
        parent = MlflowRun.start(uri, sweep.tracking.experiment, f"sweep {sweep.name}", redact_params(params),
                                 {T.SWEEP: sweep.name, T.ROLE: "sweep"})
        state = {"parent_run_id": parent.run_id, "sweep": to_dict(sweep),
                 "sweep_file": str(Path(sweep_file).absolute()), "experiments": ["."]}
        experiments = [root]

    # from here every way out ends the parent (and its children left open) FINISHED, FAILED or KILLED
    status = "FAILED"
    heartbeat = Heartbeat(parent.client, parent.run_id).start()
    try:
        if not resume:
            parent.log_text(redacted_yaml(sweep), "sweep.yaml")
            parent.log_text(redact_text(Path(sweep_file).read_text()), Path(sweep_file).name)
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"storage_path={sweep.storage_path}: cannot hold the sweep directory {root} "
                                  f"({e.strerror or e}): point it at a directory") from None
        if stop.installed():  # Tune's own SIGINT handler would end the sweep as if it had finished
            os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        init_ray((sweep.workers_per_trial + 2) * sweep.max_concurrent_trials)  # + preprocessing + the trial
        stop.reinstall()  # ray.init replaced the CLI's SIGTERM handler with one that calls sys.exit
        check_state_api()
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # eval metrics come every eval.every
        ctx = {"overrides": [*sweep.overrides, f"train.workers={sweep.workers_per_trial}",
                             f"train.max_failures={sweep.max_failures_per_trial}"],
               "name": sweep.name, "recipe": str(recipe_path(sweep, sweep_file)),
               "trials_dir": str(root / "trials"), "tracking_uri": uri, "parent_run_id": parent.run_id,
               "pbt": sweep.scheduler.name == "pbt"}
        # the trial itself only waits on its TorchTrainer: it needs (almost) no CPU of its own
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": 0.01})
        callbacks = [_mlflow_callback(uri, parent.run_id)]
        fitted = {}  # experiment directory -> its results
        if resume and not extend:
            # the last experiment continues; with retry_failed every one reruns its failed trials
            for path in experiments if retry_failed else experiments[-1:]:
                # resumed, not restarted: a restarted trial gets a new id, so a new Train run and child run
                fitted[path] = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                                  resume_errored=retry_failed, restart_errored=False).fit()
        else:
            if extend:
                configs, seeds = ran_configurations(experiments, plan.base.seed)
                space = replicated_space(configs, list(range(max(seeds) + 1, max(seeds) + 1 + extend)))
                name = f"extend{len(experiments)}"
                state = {**state, "experiments": [*state.get("experiments", ["."]), name]}
                storage = root
            else:
                space = _search_space(sweep, plan)
                name, storage = sweep.name, root.parent
            # the state file (what --resume reads) is written once Tune has started, not before: a start that
            # fails earlier (Ray, the State API, a setting Tune refuses) leaves the sweep's name free
            callbacks.append(_state_callback(state_file, state))
            # PBT clones checkpoints of other trials: keep a few (Tune warns at <= 2)
            run_config = tune.RunConfig(name=name, storage_path=str(storage), callbacks=callbacks,
                                        checkpoint_config=tune.CheckpointConfig(num_to_keep=4))
            tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                               tune_config=_tune_config(sweep, plan, replicated=extend > 0))
            fitted[storage / name] = tuner.fit()
        grids = [fitted[path] if path in fitted else tune.Tuner.restore(str(path), trainable=trainable).get_results()
                 for path in (root / e for e in state["experiments"])]
        trials, errors, best_config, best_metric = _outcome(sweep, grids)
        if best_metric is not None:
            parent.log_metrics({f"best/{sweep.metric}": best_metric}, step=0)
            parent.set_tags({f"best.{k}": str(v) for k, v in best_config.items()})
            parent.log_text(json.dumps(best_config, indent=1), "best_config.json")
        status = "FINISHED"
        return SweepSummary(sweep.name, parent.run_id, uri, best_config, best_metric, trials, errors)
    except (KeyboardInterrupt, SystemExit):  # a stop signal (SystemExit: Ray's own SIGTERM handler)
        status = "KILLED"
        raise
    except Exception as e:
        try:
            if T.FAILURE not in parent.tags():
                parent.set_tags({T.FAILURE: f"{type(e).__name__}: {_last_line(e)}"[:500]})
        except Exception:  # noqa: BLE001: the store failing too must not hide `e`
            pass
        raise
    finally:
        heartbeat.stop()
        if not resume and status != "FINISHED":
            try:
                forget_failed_start(root)
            except Exception:  # noqa: BLE001: must not hide why the sweep ended
                pass
        try:
            if status != "FINISHED":
                close_open_children(uri, parent.run_id, status)
            parent.end(status)
        except Exception as e:  # noqa: BLE001
            if status == "FINISHED":
                raise
            print(f"warning: could not end the sweep's MLflow runs {status} ({type(e).__name__}); `towerlab runs "
                  "doctor --fix` closes them once their heartbeat is stale", file=sys.stderr)


def _search_space(sweep: SweepConfig, plan) -> dict:
    """Tune's param_space of a first start: the space itself, or with search.seeds > 1 every configuration (drawn
    once) with every seed."""
    from towerlab.sweep.space import configurations, param_space

    if sweep.search.seeds == 1:
        return param_space(sweep, plan.int_keys)
    seed = plan.base.seed
    return replicated_space(configurations(sweep, plan.int_keys), list(range(seed, seed + sweep.search.seeds)))


def _tune_config(sweep: SweepConfig, plan, replicated: bool):
    from ray import tune

    from towerlab.sweep.space import scheduler, search_algorithm

    replicated = replicated or sweep.search.seeds > 1  # the configurations are a grid drawn before Tune
    return tune.TuneConfig(num_samples=1 if replicated else sweep.search.num_samples,
                           max_concurrent_trials=sweep.max_concurrent_trials,
                           search_alg=None if replicated else search_algorithm(sweep),
                           scheduler=scheduler(sweep, plan.extent(sweep)[1]), metric=sweep.metric, mode=sweep.mode)


def ran_configurations(experiments: list[Path], base_seed: int) -> tuple[list[dict], set[int]]:
    """The configurations a sweep's Tune experiments trained (without their seed, each once) and the seeds used (a
    sweep without replicates trained the recipe's own seed)."""
    from ray.tune import ExperimentAnalysis

    configs, seeds = {}, set()
    for path in experiments:
        for trial in ExperimentAnalysis(str(path)).trials:
            config = trial_config(trial.config)
            seeds.add(int(config.pop(SEED_KEY, base_seed)))
            configs.setdefault(json.dumps(config, sort_keys=True, default=str), config)
    return list(configs.values()), seeds or {base_seed}


def _outcome(sweep: SweepConfig, grids: list) -> tuple[int, int, dict, float | None]:
    """Trials, failed trials, and the best trial's config and metric over all the sweep's Tune experiments' results."""
    trials = errors = 0
    best_config, best_metric = {}, None
    best_of = max if sweep.mode == "max" else min
    for results in grids:
        trials += len(results)
        errors += sum(1 for r in results if r.error is not None)
        for r in results:
            df = r.metrics_dataframe
            series = df[sweep.metric].dropna() if df is not None and sweep.metric in df else ()
            if len(series):
                value = float(best_of(series))
                if best_metric is None or (value > best_metric if sweep.mode == "max" else value < best_metric):
                    best_config, best_metric = trial_config(dict(r.config or {})), value
    return trials, errors, best_config, best_metric


def _state_callback(state_file: Path, state: dict):
    """A Tune callback that writes the sweep's state file when Tune sets up the experiment (it has started)."""
    from ray.tune import Callback

    class WriteState(Callback):
        def setup(self, **info):
            try:
                atomic_write(state_file, json.dumps(state))
            except OSError as e:
                raise ConfigError(f"cannot write the sweep's state file {state_file} ({e.strerror or e}): point "
                                  "storage_path at a writable directory") from None

    return WriteState()


def tune_resumable(root: Path) -> bool:
    """Whether Tune saved under `root` what Tuner.restore needs: the tuner (tuner.pkl, written when the Tuner is
    built, which Tuner.can_restore looks for) and an experiment state (written once the experiment runs; without it
    the restore fails)."""
    from ray.tune import Tuner
    from ray.tune.execution.tune_controller import TuneController

    return Tuner.can_restore(str(root)) and any(root.glob(TuneController.CKPT_FILE_TMPL.format("*")))


def forget_failed_start(root: Path) -> bool:
    """After a first start that failed or was stopped: when Tune saved nothing under `root` that `--resume` could
    continue, remove the sweep's state file so the name can be used again. True when it was removed (or never
    written)."""
    if tune_resumable(root):
        return False
    (root / STATE_FILE).unlink(missing_ok=True)
    return True


def read_state(path: Path) -> dict:
    """A sweep's state file: its parent run id, the sweep as loaded and the sweep file; one line when it is not."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable towerlab sweep state ({type(e).__name__}: {e}): start the "
                          "sweep under a new name (name=...), or remove its directory to start it again") from None
    if not isinstance(state, dict) or not isinstance(state.get("parent_run_id"), str) or \
            not isinstance(state.get("sweep"), dict):
        raise ConfigError(f"{path} is not a towerlab sweep state (no parent_run_id and sweep): start the sweep under "
                          "a new name (name=...), or remove its directory to start it again")
    return state


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else ""


def close_open_children(uri: str, parent_run_id: str, status: str) -> list[str]:
    """End the sweep's child runs still RUNNING with the parent's `status` (the trials die with the sweep's driver):
    KILLED when it was stopped, FAILED (with the reason) when it failed. Returns their run ids."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    open_ = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                      "attributes.status = 'RUNNING'")
    for r in open_:
        if status == "FAILED" and T.FAILURE not in r.data.tags:
            client.set_tag(r.info.run_id, T.FAILURE, "the sweep's driver failed before this trial ended")
        client.set_terminated(r.info.run_id, status=status)
    return [r.info.run_id for r in open_]


def _check_parent(parent: MlflowRun, uri: str, sweep: SweepConfig, root: Path) -> None:
    """The parent run of a sweep to resume is in this store (not another's, nor deleted)."""
    from mlflow.exceptions import MlflowException

    fresh = f"start a new sweep with name=... or delete {root}"
    try:
        info = parent.client.get_run(parent.run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(f"{root / STATE_FILE} resumes MLflow run {parent.run_id}, which the tracking store "
                          f"{redact(uri)} does not have: use the store the sweep started in (--tracking-uri), or "
                          f"{fresh}") from None
    if info.info.lifecycle_stage == "deleted":
        raise ConfigError(f"the sweep's MLflow run {parent.run_id} is deleted in {redact(uri)}: restore it, or {fresh}")
    if is_stale(info):
        close_dead(parent.client, parent.run_id, last_beat(info))

