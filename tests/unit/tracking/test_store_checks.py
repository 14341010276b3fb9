"""Clients that fail fast: every command that talks to a tracking server ends within seconds with one `error:` line
(exit 2, no traceback) when the server's port is closed, or when it accepts connections and never answers; rank 0's
logging does not stall on an outage but buffers, and sends the buffer in order when the store is back."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from towerlab.cli import main
from towerlab.util import free_port

RUN_ID = "0123456789abcdef0123456789abcdef"


pytestmark = pytest.mark.usefixtures("restore_signals")


@pytest.fixture
def silent_server():
    """A real socket on 127.0.0.1 that accepts every connection and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(timeout=2)
    for c in held:
        c.close()
    srv.close()


COMMANDS = [
    ["compare", "--sweep", "s"],
    ["compare", RUN_ID],
    ["report", "--sweep", "s"],
    ["ui"],
    ["eval", RUN_ID],
    ["reproduce", RUN_ID],
    ["runs", "doctor"],
    ["train", "recipes/debug.yaml"],
    ["sweep", "sweeps/quickstart.yaml"],
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_silent_server_is_one_line_within_seconds(args, silent_server, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr("towerlab.tracking.uri.CHECK_TIMEOUT_S", 1.0)  # the default (5 s) is tested once below
    start = time.monotonic()
    assert main([*args, "--tracking-uri", silent_server]) == 2
    took = time.monotonic() - start
    assert took < 15, took  # the check's 1 s, plus importing the command's modules on a loaded 2-core machine
    line = _one_error_line(capsys)
    assert silent_server in line and "no answer within 1 s" in line


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_closed_port_is_one_line_at_once(args, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    assert main([*args, "--tracking-uri", uri]) == 2
    assert time.monotonic() - start < 10
    line = _one_error_line(capsys)
    assert f"{uri} is unreachable (ConnectionError)" in line


def test_default_check_gives_up_after_five_seconds(silent_server, capsys):
    start = time.monotonic()
    assert main(["compare", RUN_ID, "--tracking-uri", silent_server]) == 2
    assert 4.5 < time.monotonic() - start < 9
    assert "no answer within 5 s" in _one_error_line(capsys)


def test_the_check_bounds_mlflows_retries(monkeypatch):
    """MLflow's defaults (7 retries, backoff factor 2, 120 s per attempt) would retry for minutes after the check."""
    from towerlab.tracking.uri import CLIENT_LIMITS, WORKER_LIMITS, bound_retries

    for k in CLIENT_LIMITS:
        monkeypatch.delenv(k, raising=False)
    bound_retries()
    assert {k: __import__("os").environ[k] for k in CLIENT_LIMITS} == CLIENT_LIMITS
    bound_retries(WORKER_LIMITS)  # a worker inheriting the driver's bounds takes its own
    assert __import__("os").environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == WORKER_LIMITS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # the user's value wins
    bound_retries(WORKER_LIMITS)
    assert __import__("os").environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


def test_rank0_buffers_metrics_while_the_store_is_down(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from towerlab.tracking.mlflow_run import WorkerRun

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = f"http://127.0.0.1:{free_port()}"
    run = WorkerRun(down, RUN_ID, retry_after=3600, max_buffered=5)
    start = time.monotonic()
    run.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=1)  # one bounded try, then the buffer
    run.log_metrics({"train/loss": 0.9, "train/lr": 0.1}, step=2)  # no try before retry_after
    run.log_metrics({"train/loss": 0.8, "train/lr": 0.1}, step=3)
    assert time.monotonic() - start < 10
    assert [(m.key, m.step) for m in run.pending] == [("train/lr", 1), ("train/loss", 2), ("train/lr", 2),
                                                     ("train/loss", 3), ("train/lr", 3)]
    assert run.dropped == 1
    assert capsys.readouterr().err.count("warning: MLflow did not take rank 0's metrics") == 1

    # the store is back: the buffer goes first, in order, then the new points
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    run.client = client
    run.run_id = client.create_run(client.create_experiment("e")).info.run_id
    run._next_try = 0
    run.log_metrics({"train/loss": 0.7}, step=4)  # a sixth point: the oldest buffered one (train/lr at 1) goes
    assert run.pending == []
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train/loss")] == [
        (2, 0.9), (3, 0.8), (4, 0.7)]
    assert [m.step for m in client.get_metric_history(run.run_id, "train/lr")] == [2, 3]
    assert client.get_run(run.run_id).data.tags["towerlab.metrics_dropped"] == "2"
    assert "buffered metrics sent, 2 oldest points dropped" in capsys.readouterr().err
