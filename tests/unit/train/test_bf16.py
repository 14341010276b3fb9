"""The debug recipe's model trains in bf16 under DeepSpeed on CPU (one gloo process, no Ray), as a GPU run would
(DeepSpeed casts the parameters to bf16, never the inputs; the towers cast the fp32 images at their entry), and its
losses follow the fp32 run's.

Tolerance: 2% of the loss, step by step. bf16 keeps 8 significant bits (a relative rounding error of up to 2^-9,
0.2%, per operation); the debug towers chain about 20 rounded matmuls and norms per tower before the fp32 logits, so
the features carry errors of a few 0.1%, and the logits (up to 14 x a cosine) errors of a few hundredths; the loss
(about log 64 = 4.16 at the start) then moves by well under 1%. Three small steps (lr 3e-3) let the two runs'
weights drift apart by about one bf16 rounding of the update, which keeps them within 2%. A dtype or device bug is
not subtle: an exception, a non-finite loss, or a loss that does not move."""

from __future__ import annotations


import pytest
import torch

from towerlab.config import resolve_batch
from towerlab.train.deepspeed_config import deepspeed_config
from towerlab.train.engine import clamp_logit_scale, initialize_engine
from towerlab.train.module import build_module
from towerlab.train.recipe import load_recipe
from towerlab.train.step import contrastive_step

pytestmark = pytest.mark.slow
STEPS = 3


def _train(repo_root, precision: str, micro_batch: int) -> tuple[list[float], torch.dtype]:
    recipe = load_recipe(repo_root / "recipes" / "debug.yaml",
                         ["train.workers=1", "data.global_batch=32", f"data.micro_batch={micro_batch}",
                          "model.vision.patch_dropout=0.25"])
    recipe.train.precision = precision  # past validation, which refuses bf16 on CPU for speed, not correctness
    plan = resolve_batch(recipe.data.global_batch, 1, micro_batch)
    cfg = deepspeed_config(recipe, plan)
    engine, *_ = initialize_engine(recipe, build_module(recipe, 0, 1, cfg), cfg, STEPS)
    v, t = recipe.model.vision, recipe.model.text
    g = torch.Generator().manual_seed(3)
    images = torch.rand(32, 3, v.image_size, v.image_size, generator=g)  # fp32, as the data pipeline delivers
    texts = torch.randint(3, t.vocab_size, (32, t.context_length), generator=g)
    losses = []
    torch.manual_seed(7)  # the same patch-dropout draws in both runs
    for step in range(STEPS):
        micro = [{"image": images[i : i + micro_batch], "text": texts[i : i + micro_batch],
                  "label": torch.arange(32)[i : i + micro_batch]} for i in range(0, 32, micro_batch)]
        terms = contrastive_step(engine, micro, step)
        clamp_logit_scale(engine)
        losses.append(float(terms["loss"]))
    return losses, engine.module.model.towers["image"].conv1.weight.dtype


@pytest.mark.parametrize("micro_batch", [32, 16])  # one forward, and the feature cache over two micro-batches
def test_debug_model_trains_in_bf16_close_to_fp32(gloo, repo_root, micro_batch):
    bf16, dtype = _train(repo_root, "bf16", micro_batch)
    fp32, dtype32 = _train(repo_root, "fp32", micro_batch)
    assert dtype == torch.bfloat16 and dtype32 == torch.float32
    assert all(map(torch.isfinite, map(torch.tensor, bf16)))
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both learn
    for a, b in zip(bf16, fp32):
        assert abs(a - b) <= 0.02 * abs(b), (bf16, fp32)
