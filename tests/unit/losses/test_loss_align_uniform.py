"""Alignment + uniformity: explicit loops over pairs (i < j, as Wang & Isola write it), CLIP when weights are 0."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats


def unif(a, b, u=2.0, cross=False):
    n = a.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(n) if (i != j if cross else i < j)]
    vals = [math.exp(-u * float(((a[i] - b[j]) ** 2).sum())) for i, j in pairs]
    return math.log(sum(vals) / len(vals))


def test_matches_explicit_loops():
    f = make_feats(6, 4, seed=51, dtype=torch.float64)
    x, y = f["image"].detach(), f["text"].detach()
    t = torch.tensor(10.0, dtype=torch.float64)
    out = L.build("align_uniform", cross_uniformity=True)(f, logit_scale=t)
    clip = L.build("clip")(f, logit_scale=t)["loss"].item()
    align = sum(float(((x[i] - y[i]) ** 2).sum()) for i in range(6)) / 6
    u = 0.5 * (unif(x, x) + unif(y, y))
    xu = unif(x, y, cross=True)
    assert math.isclose(out["loss_align"].item(), align, rel_tol=1e-12)
    assert math.isclose(out["loss_unif"].item(), u, rel_tol=1e-12)
    assert math.isclose(out["loss_xunif"].item(), xu, rel_tol=1e-12)
    assert math.isclose(out["loss"].item(), clip + align + u + xu, rel_tol=1e-12)


def test_zero_weights_give_clip():
    f = make_feats(6, 4, seed=52, dtype=torch.float64)
    t = torch.tensor(10.0, dtype=torch.float64)
    out = L.build("align_uniform", align_weight=0.0, uniform_weight=0.0)(f, logit_scale=t)
    assert math.isclose(out["loss"].item(), L.build("clip")(f, logit_scale=t)["loss"].item(), rel_tol=1e-12)


def test_coinciding_embeddings_have_finite_gradients():
    x = torch.nn.functional.normalize(torch.ones(4, 3, dtype=torch.float64), dim=1).requires_grad_()
    out = L.build("align_uniform", cross_uniformity=True)({"image": x, "text": x}, logit_scale=torch.tensor(1.0))
    out["loss"].backward()
    assert torch.isfinite(x.grad).all()
