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
            "os.system('echo from a child process'); from towerlab.util import say; say('warning: for the user')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "before\n" and out.stderr == ""
    # (the order of the three is up to buffering)
    assert sorted(log.read_text().splitlines()) == ["from a child process", "python err", "python out",
                                                     "warning: for the user"]
    assert (log.parent / "console.log").read_text() == "warning: for the user\n"  # what the driver echoes


def test_lines_meant_for_the_console_reach_it_from_a_worker_writing_to_a_file(tmp_path, capsys, monkeypatch):
    """A worker's output goes to its rank log; what it says to the user (towerlab.util.say: an MLflow outage) is
    also appended to the run's console file, which the driver echoes while the run goes on, and once at the end."""
    from towerlab.train.driver import echo_console
    from towerlab.util import CONSOLE_ENV, CONSOLE_FILE, say

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / CONSOLE_FILE).write_text("warning: from an earlier launch\n")  # a resumed run does not repeat it
    monkeypatch.setenv(CONSOLE_ENV, str(logs / CONSOLE_FILE))
    with echo_console(str(logs), every_s=0.05):
        say("warning: MLflow did not take rank 0's metrics")
        import time

        time.sleep(0.5)
        echoed_live = capsys.readouterr().err
        say("MLflow answers again after 7 s: buffered metrics sent")
    err = capsys.readouterr().err
    assert echoed_live.count("warning: MLflow did not take rank 0's metrics") == 2  # say's own + the echo
    assert "from an earlier launch" not in echoed_live + err
    assert err.count("MLflow answers again after 7 s") == 2


def test_root_cause_looks_through_rays_wrappers():
    """A shard error raised in a Ray Data task on a worker arrives as WorkerGroupError -> RayTaskError(ShardError),
    whose text ends with Ray's retry advice: the user sees the shard's line."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from towerlab.data.foreign import ShardError
    from towerlab.train.driver import root_cause

    line = ("shard /d/00004.tar cannot be read (ReadError: truncated header): restore it, or set "
            "data.bad_shards=skip to train without it")
    # as Ray Data re-raises it: its retry advice appended to the message
    shard = ShardError(line + "\nTo change retry attempts, backoff, or which errors are retried, configure ...")
    task = RayTaskError("ray::FlatMap(ShardReader)()", "Traceback ...\nShardError: ...", shard).as_instanceof_cause()
    group = WorkerGroupError("rank 0: ...\nTo change retry attempts, backoff, or which errors are retried, ...",
                             {1: RuntimeError("rank 1 saw the collective fail"), 0: task})
    assert root_cause(group) == f"ShardError: {line}"
    assert root_cause(RuntimeError("outer")) == "RuntimeError: outer"
