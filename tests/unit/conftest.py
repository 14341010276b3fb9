"""Makes the shared unit-test helpers beside this file (clip_testing.py) importable under pytest's importlib import
mode, and holds fixtures several modules share: the one-process gloo group of in-process DeepSpeed tests (`gloo`), Hugging
Face kept offline (`offline`), and pytest's signal handlers restored after a command installed towerlab's
(`restore_signals`)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def gloo():
    """A one-process gloo group in the test process for deepspeed.initialize, destroyed after the module. DeepSpeed
    caches the world group it cloned and its comm backend: they are forgotten with the group, or the next module's
    group would be checked against the destroyed one ("Group ... is not registered"). DeepSpeed is imported the way
the workers import it (train/engine.py lean_deepspeed)."""
    import torch.distributed as dist

    from towerlab.util import free_port

    if not dist.is_initialized():
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"})
        dist.init_process_group("gloo", rank=0, world_size=1)
    from towerlab.train.engine import lean_deepspeed

    lean_deepspeed()  # as the workers do: no shared-memory kernel, no /dev/shm buffer left behind by the tests
    yield
    dist.destroy_process_group()
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_groups._WORLD_GROUP = None
    ds_comm.cdb = None


@pytest.fixture
def offline(monkeypatch):
    """transformers and huggingface_hub never reach for the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def restore_signals():
    """The commands install towerlab's stop handlers in this (pytest's) process: put pytest's back afterwards."""
    import signal

    from towerlab.tracking import stop

    saved = {s: signal.getsignal(s) for s in stop.SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    stop._state.update(installed=False, received=None)
