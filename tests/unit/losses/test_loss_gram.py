"""GRAM: volumes from explicit Gram determinants (LU, fp64) on a tiny batch, hand-worked volumes, the options."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats
from towerlab.losses.gram import gram_volume_sq


def naive_gram(fs, t, eps, smoothing):
    anchor, others = fs[0], fs[1:]
    n = anchor.shape[0]
    v = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            vecs = torch.stack([anchor[i]] + [o[j] for o in others])
            v[i, j] = math.sqrt(max(torch.linalg.det(vecs @ vecs.T).item(), 0.0) + eps)

    def ce(z):
        total = 0.0
        for i in range(n):
            lse = math.log(sum(math.exp(a) for a in z[i].tolist()))
            logp = [a - lse for a in z[i].tolist()]
            total += -(1 - smoothing) * logp[i] - smoothing / n * sum(logp)
        return total / n

    return ce(-t * v), ce(-t * v.T)


def test_matches_explicit_determinants():
    for mods in (["text", "image", "audio"], ["text", "image", "audio", "depth"], ["text", "image"]):
        f = make_feats(5, 4, mods, seed=101, dtype=torch.float64)
        out = L.build("gram", modalities=mods)(f, logit_scale=torch.tensor(10.0, dtype=torch.float64))
        a2t, t2a = naive_gram([f[m].detach() for m in mods], 10.0, 1e-6, 0.1)
        assert math.isclose(out["loss_anchor2tuple"].item(), a2t, rel_tol=1e-10)
        assert math.isclose(out["loss_tuple2anchor"].item(), t2a, rel_tol=1e-10)


def test_hand_worked_volumes():
    e = torch.eye(3, dtype=torch.float64)
    # Orthonormal anchor and pair: unit volume. Anchor equal to a member of the pair: zero volume.
    assert math.isclose(gram_volume_sq(e[0:1], [e[1:2], e[2:3]]).item(), 1.0, rel_tol=1e-12)
    assert abs(gram_volume_sq(e[1:2], [e[1:2], e[2:3]]).item()) < 1e-15
    # 45 degrees between the two members: det = 1 - cos^2 = 1/2, anchor orthogonal to both.
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64) / math.sqrt(2)
    assert math.isclose(gram_volume_sq(e[2:3], [e[0:1], m]).item(), 0.5, rel_tol=1e-12)


def test_gradient_is_finite_at_collapse_and_squared_option():
    x = torch.nn.functional.normalize(torch.ones(3, 4, dtype=torch.float64), dim=1).requires_grad_()
    f = {"text": x, "image": x, "audio": x}  # every volume is 0: sqrt has an infinite slope there
    out = L.build("gram")(f, logit_scale=torch.tensor(10.0, dtype=torch.float64))
    out["loss"].backward()
    assert torch.isfinite(x.grad).all()
    g = make_feats(4, 3, ["text", "image", "audio"], seed=102, dtype=torch.float64)
    sq = L.build("gram", squared_volume=True, label_smoothing=0.0)(g, logit_scale=torch.tensor(5.0, dtype=torch.float64))
    v2 = gram_volume_sq(g["text"].detach(), [g["image"].detach(), g["audio"].detach()])
    ref = torch.nn.functional.cross_entropy(-5.0 * v2, torch.arange(4))
    assert math.isclose(sq["loss_anchor2tuple"].item(), ref.item(), rel_tol=1e-12)
