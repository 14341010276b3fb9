"""MLflow 3 LoggedModels for towerlab models: an exported model directory (`towerlab export`'s hf or open_clip
output) logged once as a LoggedModel of the run that trained it, linked to the step and metrics it was taken at,
and optionally registered in the model registry. The fp32 weights are stored once per logged model (never per
checkpoint), which keeps the store's size bounded.

A sweep's best model is then found in the MLflow UI's Models tab of the experiment (or with
`search_logged_models(order_by=...)` on a metric) and registered from there or with `--register NAME`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

MODEL_TYPE = "towerlab"


def log_model(uri: str, run_id: str | None, model_dir: str | Path, name: str, step: int,
              metrics: Mapping[str, float] | None = None, params: Mapping[str, str] | None = None,
              experiment: str | None = None, register: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """Log `model_dir` as a LoggedModel (of `run_id`'s experiment, else of `experiment`), its `metrics` linked to
    it at `step`; with `register`, also register it under that name. Returns the model id."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if run_id is not None:
        exp_id = client.get_run(run_id).info.experiment_id
    else:
        exp = client.get_experiment_by_name(experiment or "towerlab")
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment or "towerlab")
    model = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE,
                                       params={k: str(v) for k, v in (params or {}).items()},
                                       tags={"towerlab.step": str(step), **(tags or {})})
    try:
        client.log_model_artifacts(model.model_id, str(model_dir))
        if run_id is not None:
            for key, value in (metrics or {}).items():
                # a run metric with model_id: the model's metrics tab shows it, at the step it was taken
                client.log_metric(run_id, key, float(value), step=step, model_id=model.model_id)
        client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    if register:
        if not _registered(client, register):
            client.create_registered_model(register)
        # source models:/ID is what links the version to the LoggedModel; MLflow's SQL registry resolves it
        # through the process-wide tracking URI rather than this client's (its own TODO), so point that here
        # for the call
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(uri):
            client.create_model_version(register, source=f"models:/{model.model_id}", run_id=run_id,
                                        model_id=model.model_id)
    return model.model_id


def _registered(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def metrics_at(uri: str, run_id: str, step: int, prefix: str = "eval/") -> dict[str, float]:
    """The run's `prefix` metrics as they were at `step` (each metric's last value logged at or before it)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith(prefix):
            upto = [m for m in client.get_metric_history(run_id, key) if m.step <= step]
            if upto:
                out[key] = max(upto, key=lambda m: (m.step, m.timestamp)).value
    return out
