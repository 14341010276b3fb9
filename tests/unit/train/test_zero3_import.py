"""`model.pretrained` under ZeRO-3: the CLIP checkpoint is copied into parameters that deepspeed.zero.Init has
already partitioned (each gathered for its copy), giving the same weights as the import without ZeRO. One gloo
process (DeepSpeed on CPU) so the test process keeps no distributed state."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, clip: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed

    from towerlab.config import resolve_batch
    from towerlab.train.deepspeed_config import deepspeed_config
    from towerlab.train.module import build_module
    from towerlab.train.recipe import load_recipe

    recipe = load_recipe(None, [f"model.pretrained=hf:{clip}", "train.zero_stage=3", "train.workers=1",
                                "data.global_batch=4"])
    cfg = deepspeed_config(recipe, resolve_batch(4, 1, None))
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1  # partition even the tiny tensors
    module = build_module(recipe, 0, 1, cfg)
    params = list(module.model.parameters())
    partitioned = sum(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params):
        full = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    torch.save({"full": full, "partitioned": partitioned, "n": len(params)}, out)
    dist.destroy_process_group()


def test_import_under_zero3_equals_the_plain_import(tmp_path):
    import torch.multiprocessing as mp

    from clip_testing import save_clip

    from towerlab.models import ContrastiveModel
    from towerlab.train.recipe import load_recipe

    save_clip(tmp_path / "clip")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "zero3.pt"
    mp.spawn(_worker, args=(port, str(tmp_path / "clip"), str(out)), nprocs=1, join=True)
    got = torch.load(out, weights_only=True)
    assert got["partitioned"] > got["n"] // 2  # ZeRO-3 really had partitioned them before the copy
    plain = ContrastiveModel(load_recipe(None, [f"model.pretrained=hf:{tmp_path / 'clip'}"]).model)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(got["full"][name], p.detach(), atol=0, rtol=0, msg=name)
