"""The tracking URI: explicit (recipe, --tracking-uri flag, MLFLOW_TRACKING_URI), else a local SQLite store under the
working directory. Resolved once on the driver and passed to workers, so no environment leaks decide it there.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from towerlab.config.errors import ConfigError
from towerlab.config.secrets import redact_uri

DEFAULT_STORE = "mlruns.db"


def resolve_uri(recipe_uri: str | None = None, flag_uri: str | None = None) -> str:
    uri = flag_uri or recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).absolute()}"
    if "://" not in uri:  # a bare path is a local store directory; make it absolute so workers find the same one
        uri = f"file://{Path(uri).absolute()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).absolute()}"
    return uri


def redact(uri: str) -> str:
    """The URI without credentials (user:password@, ?token=...), for messages, tags and the run file."""
    return redact_uri(uri)


# MLflow's client retries a failed request 7 times with a backoff factor of 2, each attempt waiting up to 120 s:
# minutes before a command learns that the server is gone. towerlab's processes bound that (a value the user set in
# the environment wins): the CLI's own look-ups (compare, ui, eval, reproduce, runs doctor) and the drivers of train
# and sweep at about 1 + 2 + 4 s of backoff plus 4 attempts of at most 20 s, rank 0's logging as in WORKER_LIMITS.
CLIENT_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# Rank 0 logs between training steps: one failed log call blocks it at most 1 + 2 s of backoff plus 3 attempts of at
# most 10 s; then its metrics wait in a buffer (tracking/mlflow_run.py, WorkerRun) instead of stalling training.
WORKER_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_retries(limits: dict[str, str] = CLIENT_LIMITS) -> None:
    """Bound MLflow's HTTP retries in this process (MLflow reads these variables at every request). A value the user
    set wins; one towerlab set (inherited by a worker from its driver) is replaced."""
    for k, v in limits.items():
        if os.environ.get(k) in (None, CLIENT_LIMITS.get(k), WORKER_LIMITS.get(k)):
            os.environ[k] = v


CHECK_TIMEOUT_S = 5.0  # for connecting to the server, and again for its answer


def check_reachable(uri: str, timeout: float | None = None) -> None:
    """Fail fast, before any process starts, when the tracking store cannot be reached: a plain HTTP request to the
    server's /health with a `timeout` for connecting and for the answer (a closed port fails at once, a server that
    accepts and never answers after `timeout` seconds), then MLflow's own retries bounded for the rest of the
    command (`bound_retries`)."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        bound_retries()
        timeout = CHECK_TIMEOUT_S if timeout is None else timeout
        try:
            resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            reason = type(e).__name__
            if isinstance(e, (requests.Timeout, socket.timeout)):
                reason = f"no answer within {timeout:g} s"
            raise ConfigError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}): start it "
                              "(`mlflow server --host 127.0.0.1`), or pass --tracking-uri / set MLFLOW_TRACKING_URI")
        if resp.status_code >= 400:
            raise ConfigError(f"MLflow tracking server {redact(uri)} answered HTTP {resp.status_code} on /health: "
                              "check the address and credentials")
    elif scheme == "sqlite":
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    elif scheme == "file":
        Path(urlparse(uri).path).mkdir(parents=True, exist_ok=True)


def require_store(uri: str, sought: str = "nothing to read") -> None:
    """For commands that only read runs: a local SQLite store that does not exist holds none (MLflow would create
    an empty one, with its log lines, and then report that nothing is found). `sought` names what was looked for."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"{sought}: no local MLflow store {redact(uri)} (train something first, or pass "
                          "--tracking-uri)")


@contextlib.contextmanager
def store_errors(uri: str):
    """A tracking store that fails mid-command (a server that went away, timed out or answers with errors after the
    bounded retries) is one line naming the store, not MLflow's traceback."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    try:
        yield
    except (MlflowException, RequestException) as e:
        lines = str(e).strip().splitlines()
        raise ConfigError(f"MLflow tracking store {redact(uri)} failed ({type(e).__name__}: "
                          f"{(lines[-1] if lines else '')[:300]}): check that it is up, or pass --tracking-uri") from None
