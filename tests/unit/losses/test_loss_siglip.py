"""SigLIP: explicit loops over all pairs, a hand-worked example, the initial-bias behaviour."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats


def naive_siglip(x, y, t, b):
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t * float(x[i] @ y[j]) + b
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    return total / n


def test_matches_explicit_loops():
    f = make_feats(6, 5, seed=21, dtype=torch.float64)
    out = L.build("siglip")(f, logit_scale=torch.tensor(10.0, dtype=torch.float64),
                            logit_bias=torch.tensor(-10.0, dtype=torch.float64))
    ref = naive_siglip(f["image"].detach(), f["text"].detach(), 10.0, -10.0)
    assert math.isclose(out["loss"].item(), ref, rel_tol=1e-12)
    assert math.isclose((out["loss_pos"] + out["loss_neg"]).item(), ref, rel_tol=1e-12)


def test_hand_worked_example():
    # Two orthogonal matched pairs, t=1, b=0: per row -log s(1) + -log s(-0) = softplus(-1) + log 2.
    e = torch.eye(2, dtype=torch.float64)
    out = L.build("siglip")({"image": e, "text": e}, logit_scale=torch.tensor(1.0, dtype=torch.float64),
                            logit_bias=torch.tensor(0.0, dtype=torch.float64))
    assert math.isclose(out["loss"].item(), math.log1p(math.exp(-1)) + math.log(2), rel_tol=1e-12)


def test_defaults_follow_the_paper():
    cfg = L.config_class("siglip")()
    assert math.isclose(1 / cfg.temperature_init, 10.0) and cfg.bias_init == -10.0


def test_no_bias_means_zero_bias():
    f = make_feats(5, 4, seed=22, dtype=torch.float64)
    fn, t = L.build("siglip"), torch.tensor(10.0, dtype=torch.float64)
    a = fn(f, logit_scale=t)["loss"]
    b = fn(f, logit_scale=t, logit_bias=torch.tensor(0.0, dtype=torch.float64))["loss"]
    assert a.item() == b.item()
