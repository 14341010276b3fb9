"""Mann-Whitney/AUC: explicit triple loops, a hand-worked example, both code paths agree."""

import math

import torch

import towerlab.losses as L
from loss_testing import make_feats, make_labels


def naive_auc(q, k, t, lab):
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        ps = [j for j in range(n) if lab[j] == lab[i]]
        ns = [j for j in range(n) if lab[j] != lab[i]]
        terms = [math.log1p(math.exp(-t * (float(q[i] @ k[p]) - float(q[i] @ k[m])))) for p in ps for m in ns]
        total += sum(terms) / len(terms) if terms else 0.0
    return total / n


def test_matches_explicit_loops():
    n = 8
    f = make_feats(n, 5, seed=111, dtype=torch.float64)
    x, y = f["image"].detach(), f["text"].detach()
    fn, t = L.build("mw_auc"), torch.tensor(10.0, dtype=torch.float64)
    out = fn(f, logit_scale=t)
    ids = list(range(n))
    assert math.isclose(out["loss_i2t"].item(), naive_auc(x, y, 10.0, ids), rel_tol=1e-12)
    assert math.isclose(out["loss_t2i"].item(), naive_auc(y, x, 10.0, ids), rel_tol=1e-12)
    labels = make_labels(n, classes=3)
    out = fn(f, logit_scale=t, labels=labels)
    assert math.isclose(out["loss_i2t"].item(), naive_auc(x, y, 10.0, labels.tolist()), rel_tol=1e-12)
    assert math.isclose(out["loss_t2i"].item(), naive_auc(y, x, 10.0, labels.tolist()), rel_tol=1e-12)


def test_hand_worked_example():
    e = torch.eye(2, dtype=torch.float64)  # s_qp = 1, s_qn = 0: each query -log sigmoid(1)
    out = L.build("mw_auc")({"image": e, "text": e}, logit_scale=torch.tensor(1.0, dtype=torch.float64))
    assert math.isclose(out["loss"].item(), math.log1p(math.exp(-1)), rel_tol=1e-12)


def test_single_positive_path_equals_mask_path():
    f = make_feats(7, 4, seed=112, dtype=torch.float64)
    fn, t = L.build("mw_auc"), torch.tensor(10.0, dtype=torch.float64)
    a = fn(f, logit_scale=t)["loss"]
    b = fn(f, logit_scale=t, pos_mask=torch.eye(7, dtype=torch.bool))["loss"]
    assert math.isclose(a.item(), b.item(), rel_tol=1e-12)
