"""Every family trains: tiny towers on a synthetic paired dataset (8 classes; each modality a different noisy
linear view of a shared latent) reach class-level retrieval far above chance, and the loss falls. Symile and GRAM
train on a synthetic THREE-modality version, retrieving the right tuple with their own score (multilinear inner
product, Gram volume)."""

import math

import pytest
import torch
from torch import nn

import towerlab.losses as L
from loss_testing import CASES
from towerlab.losses.gram import gram_volume_sq

N, CLASSES, LATENT, OBS, EMBED, STEPS = 64, 8, 6, 10, 16, 60


def synthetic(mods, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % CLASSES
    centers = torch.randn(CLASSES, LATENT, generator=g) * 2
    z = centers[labels] + 0.3 * torch.randn(N, LATENT, generator=g)
    views = {m: z @ torch.randn(LATENT, OBS, generator=g) + 0.2 * torch.randn(N, OBS, generator=g) for m in mods}
    return views, labels


def train(case):
    torch.manual_seed(0)
    fn = L.build(case["name"], **case["params"])
    mods = fn.cfg.modalities
    views, labels = synthetic(mods)
    towers = nn.ModuleDict({m: nn.Sequential(nn.Linear(OBS, 32), nn.Tanh(), nn.Linear(32, EMBED)) for m in mods})
    log_scale = nn.Parameter(torch.tensor(math.log(1 / fn.cfg.temperature_init)))
    bias = nn.Parameter(torch.tensor(fn.cfg.bias_init)) if fn.cfg.bias_init is not None else None
    params = [*towers.parameters(), log_scale, *fn.parameters()] + ([bias] if bias is not None else [])
    opt = torch.optim.Adam(params, lr=0.02)
    meta = {"labels": labels} if case.get("meta", {}).get("labels") else {}
    losses = []
    for step in range(STEPS):
        feats = {m: nn.functional.normalize(towers[m](views[m]), dim=-1) for m in mods}
        out = fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, step=step, **meta)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        with torch.no_grad():
            log_scale.clamp_(0, math.log(100))
        losses.append(out["loss"].item())
    with torch.no_grad():
        feats = {m: nn.functional.normalize(towers[m](views[m]), dim=-1) for m in mods}
    return fn, feats, labels, losses


def class_accuracy(score, labels):
    """Fraction of queries whose best-scoring candidate has the query's class (chance: 1/8)."""
    return (labels[score.argmax(dim=1)] == labels).float().mean().item()


TWO = [c for c in CASES if c["name"] not in ("symile", "gram") and not c["params"].get("tiled")]


@pytest.mark.parametrize("case", TWO, ids=[c["id"] for c in TWO])
def test_two_modality_family_learns(case):
    fn, feats, labels, losses = train(case)
    x, y = (feats[m] for m in fn.cfg.modalities)
    if case["name"] == "multihead":
        x, y = (nn.functional.normalize(f.reshape(N, fn.cfg.num_heads, -1), dim=-1).reshape(N, -1) for f in (x, y))
    assert losses[-1] < losses[0]
    # CWCL's cosine weights (w ~ 1/2 for unrelated pairs) make near-uniform targets, its known weakness: a weaker
    # bar there (chance is 1/8); the sharpened variant meets the common one.
    bar = 0.3 if case["id"] == "cwcl" else 0.6
    assert class_accuracy(x @ y.T, labels) > bar, case["id"]


@pytest.mark.parametrize("name", ["symile", "gram"])
def test_three_modality_family_learns(name):
    mods = ["text", "image", "audio"]
    fn, feats, labels, losses = train({"name": name, "params": {"modalities": mods}})
    a, b, c = (feats[m] for m in mods)
    score = (a[:, None, :] * (b * c)[None]).sum(-1) if name == "symile" else -gram_volume_sq(a, [b, c])
    assert losses[-1] < losses[0]
    assert class_accuracy(score, labels) > 0.6, name
