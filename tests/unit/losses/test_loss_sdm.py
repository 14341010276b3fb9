"""SDM: explicit loops over the KL divergence with IRRA's epsilon, a hand-worked example."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats, make_labels


def naive_sdm(q, k, t, lab, eps=1e-8):
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        z = [t * float(q[i] @ k[j]) for j in range(n)]
        lse = math.log(sum(math.exp(a) for a in z))
        p = [math.exp(a - lse) for a in z]
        y = [1.0 if lab[j] == lab[i] else 0.0 for j in range(n)]
        qd = [v / sum(y) for v in y]
        total += sum(pj * (math.log(pj) - math.log(qj + eps)) for pj, qj in zip(p, qd))
    return total / n


def test_matches_explicit_loops():
    n = 8
    f = make_feats(n, 5, seed=121, dtype=torch.float64)
    labels = make_labels(n, classes=3)
    out = L.build("sdm")(f, logit_scale=torch.tensor(20.0, dtype=torch.float64), labels=labels)
    x, y, lab = f["image"].detach(), f["text"].detach(), labels.tolist()
    i2t, t2i = naive_sdm(x, y, 20.0, lab), naive_sdm(y, x, 20.0, lab)
    assert math.isclose(out["loss_i2t"].item(), i2t, rel_tol=1e-12)
    assert math.isclose(out["loss_t2i"].item(), t2i, rel_tol=1e-12)
    assert math.isclose(out["loss"].item(), i2t + t2i, rel_tol=1e-12)  # summed, as in IRRA


def test_hand_worked_example():
    # Two orthogonal pairs, distinct ids, t = 1: p = (e, 1)/(e+1) on the row; q = (1, 0).
    e = torch.eye(2, dtype=torch.float64)
    out = L.build("sdm")({"image": e, "text": e}, logit_scale=torch.tensor(1.0, dtype=torch.float64))
    p1, p0 = math.e / (math.e + 1), 1 / (math.e + 1)
    kl = p1 * (math.log(p1) - math.log(1 + 1e-8)) + p0 * (math.log(p0) - math.log(1e-8))
    assert math.isclose(out["loss"].item(), 2 * kl, rel_tol=1e-12)
