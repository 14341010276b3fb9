"""Hard-negative mixing: CLIP during warm-up; with a pool of one hard negative and one key-key mixture the
synthetic point is that negative, which a reference written with explicit hardest-negative search reproduces
(loss and gradients, with the synthetic point detached); false negatives never enter the pool."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats, make_labels


def reference(x, y, t, labels=None):
    """Symmetric InfoNCE with each query's hardest true negative key appended (detached) to its denominator."""
    n = x.shape[0]
    lab = labels.tolist() if labels is not None else list(range(n))

    def one(q, k):
        rows = []
        for i in range(n):
            cands = [j for j in range(n) if j != i and lab[j] != lab[i]]
            hard = max(cands, key=lambda j: float(q[i].detach() @ k[j].detach()))
            z = t * (q[i] @ k.T)
            extra = t * (q[i] @ k[hard].detach())
            rows.append(torch.logsumexp(torch.cat([z, extra[None]]), 0) - z[i])
        return torch.stack(rows).mean()

    return 0.5 * (one(x, y) + one(y, x))


def test_warmup_is_clip():
    f = make_feats(6, 5, seed=81, dtype=torch.float64)
    t = torch.tensor(10.0, dtype=torch.float64)
    fn = L.build("hard_negative_mixing", warmup_steps=100)
    out = fn(f, logit_scale=t, step=99)
    assert out["mixing"].item() == 0.0
    assert math.isclose(out["loss"].item(), L.build("clip")(f, logit_scale=t)["loss"].item(), rel_tol=1e-12)
    assert fn(f, logit_scale=t, step=100)["loss"].item() > out["loss"].item()  # extra negatives raise the loss


def test_single_hard_negative_matches_reference_loss_and_gradients():
    for labels in (None, make_labels(8, classes=3)):
        f = make_feats(8, 5, seed=82, dtype=torch.float64)
        t = torch.tensor(10.0, dtype=torch.float64)
        fn = L.build("hard_negative_mixing", num_hard=1, num_mix=1, num_query_mix=0, warmup_steps=0)
        meta = {} if labels is None else {"labels": labels}
        out = fn(f, logit_scale=t, step=5, **meta)["loss"]
        ref = reference(f["image"], f["text"], t, labels)
        assert math.isclose(out.item(), ref.item(), rel_tol=1e-12)
        g = torch.autograd.grad(out, [f["image"], f["text"]])
        r = torch.autograd.grad(ref, [f["image"], f["text"]])
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b)


def test_query_mixtures_are_reproducible_per_step_and_negative_dominated():
    f = make_feats(8, 5, seed=83, dtype=torch.float64)
    t = torch.tensor(10.0, dtype=torch.float64)
    fn = L.build("hard_negative_mixing", num_hard=4, num_mix=0, num_query_mix=8, warmup_steps=0)
    a, b, c = (fn(f, logit_scale=t, step=s)["loss"].item() for s in (1, 1, 2))
    assert a == b and a != c
    from towerlab.losses.hard_negative_mixing import synthetic_negatives

    x, y = f["image"].detach(), f["text"].detach()
    pos = torch.eye(8, dtype=torch.bool)
    h, valid = synthetic_negatives(x, y, pos, slice(0, 8), fn.cfg, torch.Generator().manual_seed(0))
    assert valid.all() and torch.allclose(h.norm(dim=-1), torch.ones(8, 8, dtype=torch.float64))
    # h' = normalize(b y_i + (1-b) y_n) with b < 1/2: closer to the hard negative than to the positive key
    closer_to_neg = [(h[i] @ y[i] < (h[i] @ y.T).masked_fill(pos[i], -2).max()) for i in range(8)]
    assert sum(bool(c.any()) for c in closer_to_neg) == 8


def test_false_negatives_are_never_mixed():
    # Key 1 is a near-copy of key 0 and shares its label: it must not be query 0's hard negative.
    y = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]],
                                                   dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 2])
    from towerlab.losses.hard_negative_mixing import synthetic_negatives

    cfg = L.build("hard_negative_mixing", num_hard=1, num_mix=1, num_query_mix=0).cfg
    pos = labels[:, None] == labels[None, :]
    h, _ = synthetic_negatives(y, y, pos, slice(0, 4), cfg, torch.Generator().manual_seed(0))
    assert not torch.allclose(h[0, 0], y[1]) and torch.allclose(h[0, 0].abs().max(), torch.tensor(1.0, dtype=torch.float64))
