"""Feature-cache accumulation: k = 4 micro-batches of M give the same parameter gradients as one batch of 4M
(the negatives of the whole batch are kept), the logit scale gets its gradient once, dropout is replayed."""

import math

import torch
from torch import nn

import towerlab.losses as L
from towerlab.losses.feature_cache import feature_cache_backward


class TwoTower(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.towers = nn.ModuleDict({
            "image": nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 8)),
            "text": nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 8)),
        })
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, batch):
        return {m: nn.functional.normalize(self.towers[m](batch[m]), dim=-1) for m in ("image", "text")}


def data(n):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 6, generator=g), "text": torch.randn(n, 5, generator=g)}


def grads(*modules):
    return [p.grad.clone() if p.grad is not None else None for m in modules for p in m.parameters()]


def run_cached(model, loss, batch, k, **meta):
    m = batch["image"].shape[0] // k
    chunks = [{key: v[i * m : (i + 1) * m] for key, v in batch.items()} for i in range(k)]
    bias = model.logit_bias if loss.cfg.bias_init is not None else None
    return feature_cache_backward(
        encode_fn=model,
        micro_batches=chunks,
        loss_fn=lambda f: loss(f, logit_scale=model.logit_scale.exp(), logit_bias=bias, **meta),
        params=[model.logit_scale, bias, *loss.parameters()],
    )


def test_four_micro_batches_equal_one_batch():
    for name, params in [("clip", {}), ("siglip", {}), ("multihead", {"num_heads": 2}), ("sdm", {})]:
        batch = data(16)
        meta = {"labels": torch.arange(16) % 5} if name == "sdm" else {}
        model, loss = TwoTower(), L.build(name, **params)
        bias = model.logit_bias if loss.cfg.bias_init is not None else None
        ref = loss(model(batch), logit_scale=model.logit_scale.exp(), logit_bias=bias, **meta)
        ref["loss"].backward()
        ref_grads = grads(model, loss)
        model.zero_grad(), loss.zero_grad()
        out = run_cached(model, loss, batch, k=4, **meta)
        assert math.isclose(out["loss"].item(), ref["loss"].item(), rel_tol=1e-6)
        for a, b in zip(grads(model, loss), ref_grads):
            if b is None:
                assert a is None or a.abs().max() == 0
                continue
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_plain_accumulation_would_lose_negatives():
    # The baseline the feature cache fixes: summing 4 micro-batch losses is a different gradient.
    batch, loss = data(16), L.build("clip")
    model = TwoTower()
    loss(model(batch), logit_scale=model.logit_scale.exp())["loss"].backward()
    ref = grads(model)
    model.zero_grad()
    for i in range(4):
        chunk = {k: v[4 * i : 4 * i + 4] for k, v in batch.items()}
        (loss(model(chunk), logit_scale=model.logit_scale.exp())["loss"] / 4).backward()
    assert max((a - b).abs().max().item() for a, b in zip(grads(model), ref) if b is not None) > 1e-3


def test_dropout_masks_are_replayed():
    # With dropout the reference is the same micro-batch forwards WITH grad from the same RNG start.
    batch, loss = data(12), L.build("clip")
    model = TwoTower(dropout=0.3)
    torch.manual_seed(5)
    chunks = [{k: v[4 * i : 4 * i + 4] for k, v in batch.items()} for i in range(3)]
    feats = [model(c) for c in chunks]
    full = {m: torch.cat([f[m] for f in feats]) for m in ("image", "text")}
    loss(full, logit_scale=model.logit_scale.exp())["loss"].backward()
    ref = grads(model)
    model.zero_grad()
    torch.manual_seed(5)
    run_cached(model, loss, batch, k=3)
    for a, b in zip(grads(model), ref):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_backward_receives_every_micro_batch():
    batch, loss, model = data(8), L.build("clip"), TwoTower()
    seen = []
    feature_cache_backward(model, [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}],
                           lambda f: loss(f, logit_scale=model.logit_scale.exp()), params=[model.logit_scale],
                           backward_fn=lambda s, i, last: (seen.append((i, last)), s.backward()))
    assert seen == [(0, False), (1, True)]
