"""MLflow logging for one training run.

The driver creates (or, on resume, reopens) the run and records what makes it reproducible: the resolved recipe as
a YAML artifact and as flattened params, the git commit, the data fingerprint and package versions. Rank 0 logs
metrics into that run id by MlflowClient. The driver ends it FINISHED, FAILED or KILLED, so no run is left RUNNING.
`NoopRun` has the same interface for ranks other than 0 and for tests.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

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
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
        return cls(uri, run.info.run_id)

    def reopen(self) -> None:
        """Mark a resumed run RUNNING again (it was ended FAILED/KILLED/FINISHED by the previous launch)."""
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


def open_run(uri: str | None, run_id: str | None) -> NoopRun:
    """The tracker a worker uses: MLflow on rank 0 (uri and run id given), a no-op elsewhere."""
    return MlflowRun(uri, run_id) if uri and run_id else NoopRun()
