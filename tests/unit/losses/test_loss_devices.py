"""Device and dtype placement of every loss family, full and tiled, and of the feature cache, without a GPU.

On PyTorch's meta device a tensor has a shape, a dtype and a device but no values: any buffer, generator draw or
constant a loss makes on the CPU meets the meta features in an operation and raises "Tensor on device cpu is not on
the expected device meta", which is what a CUDA run would raise (or silently pay for with a host copy). The bf16
runs check dtypes: logits and log-sum-exps in fp32, the feature gradients in the features' own dtype."""

from __future__ import annotations

import math

import pytest
import torch

import towerlab.losses as L
from loss_testing import CASES, build_case, case_meta, make_feats
from towerlab.losses.feature_cache import feature_cache_backward

META = torch.device("meta")
# every family that has a tiled kernel, tiled (CASES holds some; the rest are added here)
TILED = [c for c in CASES if c["params"].get("tiled")]
TILED += [{"id": f"{n}_tiled_all", "name": n, "params": {"tiled": True, "tile_size": 3}}
          for n in L.LOSSES.names() if L.LOSSES.get(n).supports_tiled
          and n not in {c["name"] for c in TILED}]


def test_every_tiled_family_is_covered():
    tiled = {n for n in L.LOSSES.names() if L.LOSSES.get(n).supports_tiled}
    assert tiled and tiled <= {c["name"] for c in TILED}


def _on(case, n, device, dtype):
    fn, log_scale, bias = build_case(case)
    fn = fn.to(device)
    feats = {m: f.detach().to(device, dtype).requires_grad_() for m, f in make_feats(n, 6, fn.cfg.modalities).items()}
    log_scale = log_scale.detach().to(device).requires_grad_()
    bias = None if bias is None else bias.detach().to(device).requires_grad_()
    meta = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case_meta(case, n).items()}
    return fn, feats, log_scale, bias, meta


@pytest.mark.parametrize("case", CASES + TILED[len([c for c in CASES if c["params"].get("tiled")]):],
                         ids=lambda c: c["id"])
@pytest.mark.parametrize("world", [1, 2])
def test_loss_runs_on_meta_forward_and_backward(case, world):
    fn, feats, log_scale, bias, meta = _on(case, 8, META, torch.float32)
    for rank in range(world):
        out = fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, rank=rank, world_size=world, **meta)
        assert all(v.device == META for v in out.values()), {k: v.device for k, v in out.items()}
        leaves = [*feats.values(), log_scale, *([bias] if bias is not None else []),
                  *(p for p in fn.parameters() if p.requires_grad)]
        grads = torch.autograd.grad(out["loss"], leaves, allow_unused=True)
        assert all(g is None or g.device == META for g in grads)
        assert grads[0] is not None and grads[0].dtype == torch.float32


@pytest.mark.parametrize("case", CASES + TILED[len([c for c in CASES if c["params"].get("tiled")]):],
                         ids=lambda c: c["id"])
def test_bf16_features_give_fp32_loss_and_bf16_gradients(case):
    """bf16 features (the towers' output under DeepSpeed bf16, before normalize's fp32) go into fp32 logits: the
    loss is fp32 and within bf16's rounding of the fp32 features' loss; the gradients come back in bf16."""
    fn, feats, log_scale, bias, meta = _on(case, 8, torch.device("cpu"), torch.bfloat16)
    out = fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, **meta)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    grads = torch.autograd.grad(out["loss"], list(feats.values()), allow_unused=True)
    assert any(g is not None for g in grads)
    assert all(g is None or g.dtype == torch.bfloat16 for g in grads)
    ref = fn({m: f.detach().float() for m, f in feats.items()}, logit_scale=log_scale.exp(), logit_bias=bias, **meta)
    # identical rounded inputs, upcast: the only differences are fp32 summation orders
    torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-5, rtol=1e-5)


def test_feature_cache_on_meta():
    """The feature cache over 2 micro-batches of a meta linear "tower": features, surrogate and the parameters'
    gradients all on meta (its RNG bookkeeping is host state and must not leak into the tensors)."""
    tower = torch.nn.Linear(5, 4, device=META)
    log_scale = torch.full((), math.log(1 / 0.07), device=META, requires_grad=True)
    loss = L.build("clip", tiled=True, tile_size=3)
    micro = [torch.randn(3, 5, device=META), torch.randn(3, 5, device=META)]

    def encode(x):
        f = torch.nn.functional.normalize(tower(x), dim=-1)
        return {"image": f, "text": f.flip(1)}

    out = feature_cache_backward(encode, micro, lambda f: loss(f, logit_scale=log_scale.exp()), params=[log_scale])
    assert out["loss"].device == META
    assert tower.weight.grad is not None and tower.weight.grad.device == META
    assert log_scale.grad is not None and log_scale.grad.device == META
