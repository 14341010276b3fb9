"""The training step under a real DeepSpeed engine (one gloo process): accumulation over k micro-batches with the
feature cache moves the parameters exactly as one step over the whole batch does (SGD, so the update is the
gradient), for ZeRO stages 0 and 2."""

from __future__ import annotations


import pytest
import torch

from towerlab.config import resolve_batch
from towerlab.train.deepspeed_config import deepspeed_config
from towerlab.train.module import build_module
from towerlab.train.step import contrastive_step
from towerlab.train.recipe import load_recipe

pytestmark = pytest.mark.slow


def _step(recipe, micro_batch: int, batch: dict, stage: int) -> list[torch.Tensor]:
    import deepspeed

    recipe.train.zero_stage = stage
    recipe.data.micro_batch = micro_batch
    plan = resolve_batch(recipe.data.global_batch, 1, micro_batch)
    module = build_module(recipe, rank=0, world_size=1)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=deepspeed_config(recipe, plan),
                                      dist_init_required=False)
    n = recipe.data.global_batch
    micro = [{k: v[i : i + micro_batch] for k, v in batch.items()} for i in range(0, n, micro_batch)]
    assert len(micro) == plan.accumulation
    terms = contrastive_step(engine, micro, step=0)
    assert torch.isfinite(terms["loss"])
    return [p.detach().clone() for p in module.parameters()], float(terms["loss"])


@pytest.mark.parametrize("stage", [0, 2])
def test_feature_cache_accumulation_equals_full_batch(gloo, repo_root, stage):
    recipe = load_recipe(repo_root / "recipes" / "debug.yaml",
                         ["train.workers=1", "data.global_batch=16", "optim.grad_clip=0", "loss.label_smoothing=0.1"])
    v, t = recipe.model.vision, recipe.model.text
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(16, 3, v.image_size, v.image_size, generator=g),
             "text": torch.randint(3, t.vocab_size, (16, t.context_length), generator=g),
             "label": torch.arange(16)}
    full, loss_full = _step(recipe, 16, batch, stage)
    cached, loss_cached = _step(recipe, 4, batch, stage)
    initial = [p.detach() for p in build_module(recipe, 0, 1).parameters()]
    assert abs(loss_full - loss_cached) < 1e-5
    moved = sum(float((a - b).abs().sum()) for a, b in zip(full, initial))
    assert moved > 1e-3  # the step did something
    for a, b in zip(full, cached):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
