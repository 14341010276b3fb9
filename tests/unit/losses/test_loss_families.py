"""Checks every family shares: the rank split equals one process (loss, terms, gradients w.r.t. features, logit
scale, bias and the loss's own parameters), gradients equal finite differences, the call convention holds."""

import math

import pytest
import torch

import towerlab.losses as L
from loss_testing import CASES, build_case, case_meta, fd_grad, fp32_tolerance, make_feats, one_process, parity_excess
from loss_testing import rank_mean, split_parity

IDS = [c["id"] for c in CASES]


def test_every_registered_family_has_a_case():
    assert {c["name"] for c in CASES} == set(L.LOSSES.names())


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("world", [2, 4])
def test_rank_split_equals_one_process_fp32(case, world):
    # fp32 sums in whatever order the BLAS picks: the bound comes from this computation's own fp32 error
    fn, log_scale, bias = build_case(case)
    feats = make_feats(8, 6, fn.cfg.modalities, seed=11)
    meta = case_meta(case, 8)
    tol = fp32_tolerance(fn, feats, log_scale, bias, meta, atol=1e-6, rtol=1e-5)
    split_parity(fn, feats, log_scale, bias, world, meta, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_bound_still_catches_a_wrong_split(case):
    # The derived bound is no licence: a split whose ranks all compute rank 0's rows (the rank ignored) is off by
    # far more than it allows, in the loss or a gradient.
    fn, log_scale, bias = build_case(case)
    feats = make_feats(8, 6, fn.cfg.modalities, seed=11)
    meta = case_meta(case, 8)
    tol = fp32_tolerance(fn, feats, log_scale, bias, meta, atol=1e-6, rtol=1e-5)
    full = one_process(fn, feats, log_scale, bias, meta)
    wrong = rank_mean(fn, feats, log_scale, bias, 2, meta, ranks=[0, 0])
    assert parity_excess(wrong, full, tol) > 1000
    assert parity_excess(rank_mean(fn, feats, log_scale, bias, 2, meta), full, tol) <= 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rank_split_equals_one_process_fp64(case):
    fn = build_case(case)[0].double()
    feats = make_feats(6, 6, fn.cfg.modalities, seed=12, dtype=torch.float64)
    log_scale = torch.tensor(math.log(1 / fn.cfg.temperature_init), dtype=torch.float64, requires_grad=True)
    bias = None if fn.cfg.bias_init is None else torch.tensor(fn.cfg.bias_init, dtype=torch.float64, requires_grad=True)
    split_parity(fn, feats, log_scale, bias, 3, case_meta(case, 6), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_equal_finite_differences(case):
    fn = build_case(case)[0].double()
    feats = make_feats(5, 4, fn.cfg.modalities, seed=13, dtype=torch.float64)
    meta = case_meta(case, 5)
    # A moderate scale keeps the finite differences well conditioned.
    log_scale = torch.tensor(math.log(3.0), dtype=torch.float64, requires_grad=True)
    bias = None if fn.cfg.bias_init is None else torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    first = fn.cfg.modalities[0]

    def loss(x, ls=None):
        f = dict(feats, **{first: x})
        return fn(f, logit_scale=(log_scale if ls is None else ls).exp(), logit_bias=bias, **meta)["loss"]

    x = feats[first].detach().clone().requires_grad_()
    gx, gs = torch.autograd.grad(loss(x, log_scale), [x, log_scale])
    skip = case.get("fd_skip", [])
    if "features" not in skip:
        torch.testing.assert_close(gx, fd_grad(loss, x), atol=1e-7, rtol=1e-5)
    if "scale" not in skip:
        fd_s = fd_grad(lambda s: loss(x.detach(), s), log_scale.detach())
        torch.testing.assert_close(gs, fd_s, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_features_give_fp32_scalar_terms(case):
    fn, log_scale, bias = build_case(case)
    feats = {m: f.detach().bfloat16() for m, f in make_feats(8, 6, fn.cfg.modalities, seed=14).items()}
    out = fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, **case_meta(case, 8))
    assert "loss" in out
    for k, v in out.items():
        assert v.ndim == 0 and v.dtype == torch.float32 and torch.isfinite(v), (k, v)


def test_bias_is_refused_where_it_cancels():
    with pytest.raises(ValueError, match="bias_init"):
        L.build("dcl", bias_init=-10.0)


def test_tiled_is_refused_where_there_is_no_kernel():
    with pytest.raises(ValueError, match="tiled"):
        L.build("sdm", tiled=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_one_scale_and_bias_as_the_model_holds_them(case):
    # The model keeps its log scale and bias as [1] tensors (DeepSpeed broadcasts need a dimension).
    fn, log_scale, bias = build_case(case)
    feats = make_feats(6, 6, fn.cfg.modalities, seed=15)
    ls1 = log_scale.detach().reshape(1).requires_grad_()
    b1 = None if bias is None else bias.detach().reshape(1).requires_grad_()
    out = fn(feats, logit_scale=ls1.exp(), logit_bias=b1, **case_meta(case, 6))
    ref = fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, **case_meta(case, 6))
    for k, v in out.items():
        assert v.shape == (), (k, v.shape)
        torch.testing.assert_close(v, ref[k])
    leaves = [ls1] + ([b1] if b1 is not None else [])
    for g in torch.autograd.grad(out["loss"], leaves, allow_unused=True):
        assert g is None or g.shape == (1,)
