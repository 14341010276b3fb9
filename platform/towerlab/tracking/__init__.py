"""Tracking: the tracking URI, MLflow runs (rank 0 logs; the driver opens and ends), and a no-op run for tests."""

from towerlab.tracking.mlflow_run import MlflowRun, NoopRun, open_run
from towerlab.tracking.uri import bound_retries, check_reachable, redact, resolve_uri

__all__ = ["MlflowRun", "NoopRun", "bound_retries", "check_reachable", "open_run", "redact", "resolve_uri"]
