"""Makes the shared unit-test helpers beside this file (clip_testing.py) importable under pytest's importlib import
mode, and holds the one-process gloo group that in-process DeepSpeed tests share (`gloo`)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def gloo():
    """A one-process gloo group in the test process for deepspeed.initialize, destroyed after the module. DeepSpeed
    caches the world group it cloned and its comm backend: they are forgotten with the group, or the next module's
    group would be checked against the destroyed one ("Group ... is not registered")."""
    import torch.distributed as dist

    from towerlab.util import free_port

    if not dist.is_initialized():
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"})
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_groups._WORLD_GROUP = None
    ds_comm.cdb = None
