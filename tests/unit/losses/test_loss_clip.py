"""CLIP (symmetric InfoNCE): explicit loops, a hand-worked example, finite differences, rank-split parity."""

import math

import torch

import towerlab.losses as L
from loss_testing import fd_grad, make_feats, naive_infonce, scalar_leaf, split_parity


def test_matches_explicit_loops():
    f = make_feats(6, 5, seed=3, dtype=torch.float64)
    for eps, bias in [(0.0, None), (0.1, -2.0)]:
        fn = L.build("clip", label_smoothing=eps)
        b = None if bias is None else torch.tensor(bias, dtype=torch.float64)
        out = fn(f, logit_scale=torch.tensor(7.0, dtype=torch.float64), logit_bias=b)
        x, y = f["image"].detach(), f["text"].detach()
        i2t, t2i = naive_infonce(x, y, 7.0, eps, bias or 0.0), naive_infonce(y, x, 7.0, eps, bias or 0.0)
        assert math.isclose(out["loss_i2t"].item(), i2t, rel_tol=1e-12)
        assert math.isclose(out["loss_t2i"].item(), t2i, rel_tol=1e-12)
        assert math.isclose(out["loss"].item(), (i2t + t2i) / 2, rel_tol=1e-12)


def test_hand_worked_example():
    # Two orthogonal matched pairs at t=1: logits [[1,0],[0,1]], each row -log(e/(e+1)) = log(1+1/e).
    e = torch.eye(2, dtype=torch.float64)
    out = L.build("clip")({"image": e, "text": e}, logit_scale=torch.tensor(1.0, dtype=torch.float64))
    assert math.isclose(out["loss"].item(), math.log(1 + math.exp(-1)), rel_tol=1e-12)


def test_gradients_by_finite_differences():
    f = make_feats(5, 4, seed=4, dtype=torch.float64)
    fn = L.build("clip", label_smoothing=0.1)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def loss(x):
        return fn({"image": x, "text": f["text"]}, logit_scale=s)["loss"]

    x = f["image"].detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x), [x])
    torch.testing.assert_close(g, fd_grad(loss, x), atol=1e-8, rtol=1e-6)


def test_two_ranks_equal_one_process():
    for eps, bias in [(0.0, None), (0.1, -1.5)]:
        fn = L.build("clip", label_smoothing=eps)
        f = make_feats(8, 6, seed=5)
        split_parity(fn, f, scalar_leaf(math.log(1 / 0.07)), scalar_leaf(bias), world=2, meta={})
        split_parity(fn, f, scalar_leaf(math.log(1 / 0.07)), scalar_leaf(bias), world=4, meta={})
