"""Start-up marks (train/startup.py) and the DeepSpeed import that builds no kernel training never uses
(train/engine.py lean_deepspeed)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from towerlab.train.startup import PHASES, Timeline, durations


def test_marks_are_seconds_since_launch_and_durations_their_differences():
    t = Timeline(time.time() - 10)
    t.mark("checks")
    t.mark("ray")  # "mlflow" left out (e.g. not reached): "ray" counts from "checks"
    assert 10 <= t.marks["checks"] <= t.marks["ray"] < 20
    assert set(t.metrics()) == {"startup/checks_s", "startup/ray_s"}
    d = durations({"checks": 4.0, "ray": 10.5, "workers": 30.0})
    assert d == {"checks": 4.0, "ray": 6.5, "workers": 19.5}
    with pytest.raises(ValueError, match="first_step"):
        t.mark("first_stpe")


def test_worker_marks_continue_the_drivers():
    driver = Timeline()
    driver.mark("checks")
    worker = Timeline(driver.t0, driver.marks)  # what the loop rebuilds from train_loop_config["startup"]
    worker.mark("first_step")
    assert list(worker.metrics()) == ["startup/checks_s", "startup/first_step_s"]
    assert PHASES.index("first_step") == len(PHASES) - 1


@pytest.mark.slow
def test_deepspeed_comm_builds_no_shared_memory_kernel(tmp_path):
    """Through lean_deepspeed, setting up DeepSpeed's CPU backend neither probes nor compiles nor loads its
    shared-memory kernel (an empty extensions cache stays empty), and no /dev/shm buffer is mapped."""
    code = f"""
import os, glob
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["TORCH_EXTENSIONS_DIR"] = {str(tmp_path)!r}
from towerlab.train.engine import lean_deepspeed
from towerlab.util import free_port
ds = lean_deepspeed()
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{free_port()}}", rank=0, world_size=1)
before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
ds.init_distributed(dist_init_required=False)
from deepspeed.comm import comm
print("shm_op", comm.cdb.shm_comm_op)
print("new_shm", sorted(set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shm_op None" in out.stdout and "new_shm []" in out.stdout, out.stdout
    assert list(tmp_path.iterdir()) == []


def test_early_start_fetches_the_first_item_while_the_caller_works():
    from towerlab.data.pipeline import EarlyStart

    fetched = []

    def items():
        fetched.append(time.time())  # the first item's wait begins when EarlyStart is made, not at take()
        yield from range(4)

    made = time.time()
    early = EarlyStart(items())
    time.sleep(0.3)  # the caller's own work (the worker: model and engine)
    assert fetched and fetched[0] - made < 0.25
    assert list(early.take()) == [0, 1, 2, 3]
    assert list(EarlyStart(iter(())).take()) == []


def test_early_start_raises_the_fetch_error_at_take():
    from towerlab.data.pipeline import EarlyStart

    def broken():
        raise OSError("shard 00003.tar cannot be read")
        yield  # noqa: unreachable - a generator

    early = EarlyStart(broken())
    with pytest.raises(OSError, match="00003.tar"):
        early.take()
