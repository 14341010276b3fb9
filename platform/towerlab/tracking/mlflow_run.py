"""MLflow logging for one training run.

The driver creates (or, on resume, reopens) the run and records what makes it reproducible: the resolved recipe as
a YAML artifact and as flattened params, the git commit, the data fingerprint and package versions. Rank 0 logs
metrics into that run id by MlflowClient. The driver ends it FINISHED, FAILED or KILLED, so no run is left RUNNING.
`NoopRun` has the same interface for ranks other than 0 and for tests.

Rank 0 logs through `WorkerRun`: an MLflow outage during training must not stall it. Each log call is bounded
(tracking/uri.py WORKER_LIMITS); when one fails, its metrics and every later one wait in a buffer of at most
MAX_BUFFERED points (the oldest are dropped beyond, and counted) and the store is tried again RETRY_AFTER_S later,
so training loses at most one bounded wait per RETRY_AFTER_S of an outage. The buffer is sent in order once the
store answers; what could not be sent is said in the worker's log and as a tag, never silently.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping

from towerlab.config.errors import ConfigError
from towerlab.tracking import tags as T
from towerlab.util import say

TERMINAL = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_LEN = 6000


class NoopRun:
    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_text(self, text: str, path: str) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def flush(self) -> bool:
        """Send what waits in a buffer (WorkerRun); True when nothing is left."""
        return True

    def metric_keys(self, prefix: str = "") -> list[str]:
        return []

    def history(self, key: str) -> list[tuple[int, float]]:
        return []


class MlflowRun(NoopRun):
    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str], parent_run_id: str | None = None) -> "MlflowRun":
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self = cls(uri, run.info.run_id)
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        try:
            for i in range(0, len(items), 100):
                client.log_batch(run.info.run_id, params=items[i : i + 100])
        except BaseException as e:  # the run exists now: it must not stay RUNNING
            self.fail(e)
            from mlflow.exceptions import MlflowException

            if isinstance(e, MlflowException) and e.error_code == "INVALID_PARAMETER_VALUE":
                raise ConfigError(f"MLflow refused the run's params: {_last_line(e)} (recipe keys become param "
                                  "names: rename the key, e.g. an evals name)") from None
            raise
        return self

    def fail(self, e: BaseException) -> None:
        """End this run FAILED with `e` as its failure tag (KILLED for an interrupt), as far as the store allows:
        the caller goes on raising `e`, the root cause, and a second error from the store must not hide it."""
        try:
            if isinstance(e, KeyboardInterrupt):
                self.end("KILLED")
                return
            self.client.set_tag(self.run_id, T.FAILURE, f"{type(e).__name__}: {_last_line(e)}"[:500])
            self.end("FAILED")
        except Exception as second:  # noqa: BLE001
            print(f"warning: could not mark MLflow run {self.run_id} ended ({type(second).__name__}); "
                  "`towerlab runs doctor --fix` closes it once its heartbeat is stale", file=sys.stderr)

    def reopen(self) -> None:
        """Mark a resumed run RUNNING again (it was ended FAILED/KILLED/FINISHED by the previous launch). The failure
        of the launch before moves to `towerlab.previous_failure`, so the failure tag only ever tells this launch's."""
        failure = self.tags().get(T.FAILURE)
        if failure is not None:
            self.client.set_tag(self.run_id, T.PREVIOUS_FAILURE, failure)
            self.client.delete_tag(self.run_id, T.FAILURE)
        self.client.update_run(self.run_id, status="RUNNING")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        assert status in TERMINAL, status
        self.client.set_terminated(self.run_id, status=status)

    def metric_keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.client.get_run(self.run_id).data.metrics if k.startswith(prefix))

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else ""


def _say(line: str) -> None:
    """One line for the user (towerlab.util.say: the driver echoes it when the worker's output goes to a file). Not
    print(): Ray Train patches print on its workers and, because Ray also replaced sys.stderr, writes each printed
    line twice (to the stream and through its logger)."""
    say(line)


MAX_BUFFERED = 100_000  # metric points kept while the store is down (a few MB)
RETRY_AFTER_S = 120.0


class WorkerRun(MlflowRun):
    """Rank 0's run: metric logging that waits in a bounded buffer while the store is down (see the module
    docstring). Tags, artifacts and reads are sent at once, after the buffer."""

    def __init__(self, uri: str, run_id: str, retry_after: float = RETRY_AFTER_S, max_buffered: int = MAX_BUFFERED):
        super().__init__(uri, run_id)
        self.retry_after, self.max_buffered = retry_after, max_buffered
        self.pending: list = []  # mlflow Metric entities, in logging order
        self.dropped = 0
        self.down_since: float | None = None
        self._next_try = 0.0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self.pending) > self.max_buffered:
            self.dropped += len(self.pending) - self.max_buffered
            del self.pending[: len(self.pending) - self.max_buffered]
        if time.monotonic() >= self._next_try:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered; False (and the buffer kept) when the store does not take it."""
        try:
            while self.pending:
                batch = self.pending[:1000]  # MLflow's log_batch limit
                self.client.log_batch(self.run_id, metrics=batch)
                del self.pending[: len(batch)]
        except Exception as e:  # noqa: BLE001: an outage must not end training; it is said below
            if self.down_since is None:
                self.down_since = time.time()
                _say(f"warning: MLflow did not take rank 0's metrics ({type(e).__name__}: {_last_line(e)[:200]}); "
                     f"buffering up to {self.max_buffered} points, next try in {self.retry_after:g} s")
            self._next_try = time.monotonic() + self.retry_after
            return False
        if self.down_since is not None:
            outage = f"{time.time() - self.down_since:.0f} s"
            _say(f"MLflow answers again after {outage}: buffered metrics sent"
                 + (f", {self.dropped} oldest points dropped" if self.dropped else ""))
            if self.dropped:
                self.client.set_tag(self.run_id, "towerlab.metrics_dropped", str(self.dropped))
            self.down_since = None
        return True

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.flush()
        super().set_tags(tags)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.flush()
        super().log_artifact(local_path, artifact_path)

    def metric_keys(self, prefix: str = "") -> list[str]:
        self.flush()
        return super().metric_keys(prefix)


def open_run(uri: str | None, run_id: str | None) -> NoopRun:
    """The tracker a worker uses: MLflow on rank 0 (uri and run id given), with bounded retries and a buffer while
    the store is down; a no-op elsewhere."""
    if not (uri and run_id):
        return NoopRun()
    from towerlab.tracking.uri import WORKER_LIMITS, bound_retries

    bound_retries(WORKER_LIMITS)
    return WorkerRun(uri, run_id)
