"""The tracking URI: explicit (recipe, --tracking-uri flag, MLFLOW_TRACKING_URI), else a local SQLite store under the
working directory. Resolved once on the driver and passed to workers, so no environment leaks decide it there.
"""

from __future__ import annotations

import os
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


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any process starts, when the tracking store cannot be reached."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            reason = type(e).__name__
            raise ConfigError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}): start it "
                              "(`mlflow server --host 127.0.0.1`), or pass --tracking-uri / set MLFLOW_TRACKING_URI")
        if resp.status_code >= 400:
            raise ConfigError(f"MLflow tracking server {redact(uri)} answered HTTP {resp.status_code} on /health: "
                              "check the address and credentials")
    elif scheme == "sqlite":
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    elif scheme == "file":
        Path(urlparse(uri).path).mkdir(parents=True, exist_ok=True)
