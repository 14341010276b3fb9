"""The quiet console: without -v, Ray does not stream worker logs, Ray Data shows no progress bars and the workers
write their output (file descriptors 1 and 2, C++ included) under the run directory; with -v, all of it streams
as Ray does by default, and the flag reaches every task and actor of the job."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from towerlab.train.driver import worker_log_dir
from towerlab.train.ray_env import _console, ingest_config
from towerlab.train.recipe import load_recipe
from towerlab.util import VERBOSE_ENV


def test_quiet_by_default_loud_with_verbose(monkeypatch):
    from ray.data import DataContext

    recipe = load_recipe(None, [])
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    quiet = _console("http://127.0.0.1:1")
    assert quiet["log_to_driver"] is False and quiet["logging_level"] == logging.WARNING
    assert VERBOSE_ENV not in quiet["runtime_env"]["env_vars"]
    ingest_config(recipe)
    assert DataContext.get_current().enable_progress_bars is False
    assert worker_log_dir(recipe, Path("/r/run")) == "/r/run/logs"

    monkeypatch.setenv(VERBOSE_ENV, "1")
    loud = _console("http://127.0.0.1:1")
    assert loud["log_to_driver"] is True and loud["logging_level"] == logging.INFO
    assert loud["runtime_env"]["env_vars"][VERBOSE_ENV] == "1"  # a sweep's trials stream theirs too
    ingest_config(recipe)
    assert DataContext.get_current().enable_progress_bars is True
    assert worker_log_dir(recipe, Path("/r/run")) is None
    monkeypatch.delenv(VERBOSE_ENV)
    assert worker_log_dir(load_recipe(None, ["train.storage_path=s3://bucket/results"]), Path("/x")) is None


def test_redirect_output_takes_the_process_and_its_children(tmp_path):
    log = tmp_path / "logs" / "rank0.log"
    code = ("import os, sys; from towerlab.util import redirect_output; print('before'); sys.stdout.flush(); "
            f"redirect_output({str(log)!r}); print('python out'); print('python err', file=sys.stderr); "
            "os.system('echo from a child process')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "before\n" and out.stderr == ""
    # (the order of the three is up to buffering)
    assert sorted(log.read_text().splitlines()) == ["from a child process", "python err", "python out"]
