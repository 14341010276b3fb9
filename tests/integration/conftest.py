"""Real servers for integration tests, started once per session on 127.0.0.1:

- `ray_cluster`: `ray start --head` (dashboard with the State and Jobs APIs) with 8 logical CPUs, so two sweep
  trials (2 training workers, Ray Data's preprocessing and the trial each) fit at once on a 2-core machine (start-up
  is mostly waiting, not computing), and token authentication on (a fresh token in
  RAY_AUTH_TOKEN, RAY_AUTH_MODE=token for the cluster and every client); stopped at the end of the session.
- `mlflow_server`: `mlflow server` with a SQLite backend and a local artifact store.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

BIN = Path(sys.executable).parent


RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, 52366}  # a random port must not fall on a Ray default

# Ray reads RAY_AUTH_MODE once per process, when its config is first touched: a test module that imports Ray's job
# SDK while pytest collects would fix this process at "disabled" before the ray_cluster fixture runs, and in-process
# clients of the cluster would then be refused. So the session's token is chosen here, before any test module loads.
SESSION_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
os.environ.update(SESSION_AUTH)
# the test cluster is one node that is never drained: no preemption-watcher actor per worker group (the setting a
# local Ray gets from towerlab, train/ray_env.py); the CLI runs inherit it and pass it to Ray Train's controller
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Address of a head node started with `ray start --block` on loopback; RAY_ADDRESS points at it for the session.

    `--block` keeps the head in the foreground of its own process group, so teardown stops exactly this cluster
    (`ray stop` would stop every Ray on the machine, other test sessions' included).
    """
    port, dash = free_port(), free_port()
    auth = dict(SESSION_AUTH)
    env = {**os.environ, **auth}
    env.pop("RAY_ADDRESS", None)
    root = tmp_path_factory.mktemp("ray")
    log = open(root / "ray-start.log", "w")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=8", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", *auth)}
    os.environ.update({"RAY_ADDRESS": address, **auth})
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 120, proc)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "auth": auth}
    finally:
        # a clean `ray start --block` shutdown takes over 30 s here; the whole group is ours to kill sooner
        stop_group(proc, timeout=5)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI of a real `mlflow server` (SQLite backend) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        # MLflow 3's server also starts a job runner (eight huey consumer processes) for its GenAI jobs: nothing
        # here uses it, and on 2 cores its start-up competes with the tests
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 120, proc)
        yield uri
    finally:
        stop_group(proc)
        log.close()


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `towerlab` console script."""
    exe = shutil.which("towerlab", path=str(BIN)) or str(BIN / "towerlab")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
