"""CWCL: explicit loops with the cosine weights; a sharp weighting reduces to InfoNCE; frozen features via meta."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats


def naive_cwcl(p, v, q, t):
    n = p.shape[0]
    total = 0.0
    for i in range(n):
        z = [t * float(p[i] @ v[j]) for j in range(n)]
        lse = math.log(sum(math.exp(a) for a in z))
        w = [float(q[i] @ q[j]) / 2 + 0.5 for j in range(n)]
        total += -sum(wj * (zj - lse) for wj, zj in zip(w, z)) / sum(w)
    return total / n


def test_matches_explicit_loops():
    f = make_feats(6, 5, seed=61, dtype=torch.float64)
    x, y = f["image"].detach(), f["text"].detach()
    out = L.build("cwcl", weights_from="text")(f, logit_scale=torch.tensor(10.0, dtype=torch.float64))
    assert math.isclose(out["loss_i2t"].item(), naive_cwcl(x, y, y, 10.0), rel_tol=1e-12)
    assert math.isclose(out["loss_t2i"].item(), naive_cwcl(y, x, y, 10.0), rel_tol=1e-12)


def test_sharp_weights_reduce_to_infonce_and_asymmetric_uses_clip():
    f = make_feats(6, 5, seed=62, dtype=torch.float64)
    t = torch.tensor(10.0, dtype=torch.float64)
    sharp = L.build("cwcl", weight_temperature=1e-4, symmetric=False)(f, logit_scale=t)
    clip = L.build("clip")(f, logit_scale=t)
    assert math.isclose(sharp["loss_i2t"].item(), clip["loss_i2t"].item(), rel_tol=1e-9)
    assert math.isclose(sharp["loss_t2i"].item(), clip["loss_t2i"].item(), rel_tol=1e-12)


def test_frozen_features_from_meta_are_used_and_detached():
    f = make_feats(5, 4, seed=63, dtype=torch.float64)
    frozen = make_feats(5, 4, seed=64, dtype=torch.float64)["image"]
    fn, t = L.build("cwcl"), torch.tensor(10.0, dtype=torch.float64)
    out = fn(f, logit_scale=t, frozen_features=frozen)
    x, y = f["image"].detach(), f["text"].detach()
    assert math.isclose(out["loss_i2t"].item(), naive_cwcl(x, y, frozen.detach(), 10.0), rel_tol=1e-12)
    out["loss"].backward()
    assert frozen.grad is None
