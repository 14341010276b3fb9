"""Multi-head: one head is CLIP; each head is CLIP at its own temperature; both feature conventions agree."""

import math

import torch
import torch.nn.functional as F

import towerlab.losses as L
from loss_testing import make_feats


def test_one_head_is_clip():
    f = make_feats(6, 4, seed=71, dtype=torch.float64)
    t = torch.tensor(14.0, dtype=torch.float64)
    a = L.build("multihead", num_heads=1).double()(f, logit_scale=t)["loss"]
    assert math.isclose(a.item(), L.build("clip")(f, logit_scale=t)["loss"].item(), rel_tol=1e-12)


def test_heads_use_their_own_temperatures():
    f = make_feats(6, 8, seed=72, dtype=torch.float64)
    fn = L.build("multihead", num_heads=2).double()
    with torch.no_grad():
        fn.log_scale_offset.copy_(torch.tensor([0.0, math.log(2.0)], dtype=torch.float64))
    out = fn(f, logit_scale=torch.tensor(5.0, dtype=torch.float64))
    clip = L.build("clip")
    for h, t in enumerate((5.0, 10.0)):
        part = {m: F.normalize(v[:, 4 * h : 4 * h + 4], dim=1) for m, v in f.items()}
        ref = clip(part, logit_scale=torch.tensor(t, dtype=torch.float64))["loss"]
        assert math.isclose(out[f"loss_head{h}"].item(), ref.item(), rel_tol=1e-12)
        assert math.isclose(out[f"scale_head{h}"].item(), t, rel_tol=1e-12)
    out["loss"].backward()
    assert fn.log_scale_offset.grad is not None and fn.log_scale_offset.grad.abs().min() > 0


def test_three_d_features_equal_split_features():
    f = make_feats(5, 6, seed=73, dtype=torch.float64)
    three_d = {m: F.normalize(v.reshape(5, 2, 3), dim=-1) for m, v in f.items()}
    fn, t = L.build("multihead", num_heads=2).double(), torch.tensor(8.0, dtype=torch.float64)
    assert math.isclose(fn(f, logit_scale=t)["loss"].item(), fn(three_d, logit_scale=t)["loss"].item(), rel_tol=1e-12)


def test_head_scales_are_clamped():
    fn = L.build("multihead", num_heads=2, max_logit_scale=100.0)
    with torch.no_grad():
        fn.log_scale_offset.fill_(5.0)
    assert torch.allclose(fn.head_scales(torch.tensor(50.0)), torch.tensor(100.0))
