"""DCL / DCLW: explicit loops, the vMF weights, and the temperature guard's gradient routing."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats


def naive_dcl(x, y, t, w=None):
    n = x.shape[0]
    w = w or [1.0] * n

    def one(q, k):
        total = 0.0
        for i in range(n):
            neg = [math.exp(t * float(q[i] @ k[j])) for j in range(n) if j != i]
            total += -w[i] * t * float(q[i] @ k[i]) + math.log(sum(neg))
        return total / n

    return one(x, y), one(y, x)


def test_dcl_matches_explicit_loops():
    f = make_feats(6, 5, seed=31, dtype=torch.float64)
    x, y = f["image"].detach(), f["text"].detach()
    out = L.build("dcl", temperature_guard=False)(f, logit_scale=torch.tensor(10.0, dtype=torch.float64))
    xy, yx = naive_dcl(x, y, 10.0)
    assert math.isclose(out["loss_i2t"].item(), xy, rel_tol=1e-12)
    assert math.isclose(out["loss"].item(), (xy + yx) / 2, rel_tol=1e-12)


def test_dclw_weights_and_loops():
    f = make_feats(6, 5, seed=32, dtype=torch.float64)
    x, y = f["image"].detach(), f["text"].detach()
    s = [float(x[i] @ y[i]) for i in range(6)]
    z = sum(math.exp(v / 0.5) for v in s)
    w = [2 - 6 * math.exp(v / 0.5) / z for v in s]  # 2 - N softmax(s_ii / sigma)
    out = L.build("dclw", sigma=0.5, temperature_guard=False)(f, logit_scale=torch.tensor(10.0, dtype=torch.float64))
    xy, yx = naive_dcl(x, y, 10.0, w)
    assert math.isclose(out["loss"].item(), (xy + yx) / 2, rel_tol=1e-12)
    assert math.isclose(sum(w) / 6, 1.0, rel_tol=1e-12)  # the weights average to 1


def test_dclw_equals_dcl_when_all_positives_are_equally_hard():
    e = torch.eye(4, dtype=torch.float64)  # s_ii = 1 for every i: every weight is 1
    t = torch.tensor(5.0, dtype=torch.float64)
    a = L.build("dclw", temperature_guard=False)({"image": e, "text": e}, logit_scale=t)["loss"]
    b = L.build("dcl", temperature_guard=False)({"image": e, "text": e}, logit_scale=t)["loss"]
    assert math.isclose(a.item(), b.item(), rel_tol=1e-12)


def test_guard_routes_the_temperature_gradient_through_infonce():
    f = make_feats(6, 5, seed=33, dtype=torch.float64)
    ls = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    guarded = L.build("dcl")(f, logit_scale=ls.exp())
    plain = L.build("dcl", temperature_guard=False)(f, logit_scale=ls.exp())
    clip = L.build("clip")(f, logit_scale=ls.exp())
    assert math.isclose(guarded["loss"].item(), plain["loss"].item(), rel_tol=1e-12)  # DCL's value
    g_feat, g_t = torch.autograd.grad(guarded["loss"], [f["image"], ls])
    p_feat, p_t = torch.autograd.grad(plain["loss"], [f["image"], ls])
    (c_t,) = torch.autograd.grad(clip["loss"], [ls])
    torch.testing.assert_close(g_feat, p_feat)  # encoders: DCL's gradient
    torch.testing.assert_close(g_t, c_t)  # temperature: InfoNCE's gradient
    assert not torch.isclose(p_t, c_t)


def test_unguarded_dcl_is_unbounded_below_in_t_and_the_guard_is_not():
    e = torch.eye(3, dtype=torch.float64)  # separable: s_ii = 1 > s_ij = 0
    for t in (10.0, 100.0, 1000.0):
        dcl = L.build("dcl", temperature_guard=False)({"image": e, "text": e}, logit_scale=torch.tensor(t, dtype=torch.float64))
        assert dcl["loss"].item() < -t + 2  # = -t + log 2 exactly
    ls = torch.tensor(math.log(1000.0), dtype=torch.float64, requires_grad=True)
    out = L.build("dcl")({"image": e, "text": e}, logit_scale=ls.exp())
    (g,) = torch.autograd.grad(out["loss"], [ls])
    assert abs(g.item()) < 1e-6  # InfoNCE is saturated: no pull to larger t
