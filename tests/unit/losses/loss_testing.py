"""Shared pieces of the loss tests: feature makers, the family cases, and the rank-split parity check."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import towerlab.losses as L


def make_feats(n: int, d: int, mods=("image", "text"), seed: int = 0, dtype=torch.float32, corr: float = 0.5):
    """Leaf features, L2-normalised; modality k is correlated with modality 0 so positives are above chance."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = {}
    for m in mods:
        f = corr * base + torch.randn(n, d, generator=g, dtype=torch.float64)
        out[m] = F.normalize(f, dim=-1).to(dtype).requires_grad_()
    return out


MODS3 = ["image", "text", "audio"]

# Every family (and its variants) as built in the parity tests; "meta" flags: labels -> gathered class ids.
# "fd" names the gradients that are, by design, not those of the reported value (finite differences skip them):
# the DCL guard routes t's gradient through InfoNCE; DCLW's weights and MoCHi's synthetic points are detached.
CASES = [
    {"id": "clip", "name": "clip", "params": {}},
    {"id": "clip_ls_bias", "name": "clip", "params": {"label_smoothing": 0.1, "bias_init": -1.0}},
    {"id": "clip_tiled", "name": "clip", "params": {"tiled": True, "tile_size": 3, "label_smoothing": 0.1}},
    {"id": "siglip", "name": "siglip", "params": {}},
    {"id": "siglip_tiled", "name": "siglip", "params": {"tiled": True, "tile_size": 3}},
    {"id": "dcl", "name": "dcl", "params": {}, "fd_skip": ["scale"]},
    {"id": "dcl_unguarded", "name": "dcl", "params": {"temperature_guard": False}},
    {"id": "dcl_tiled", "name": "dcl", "params": {"tiled": True, "tile_size": 3}, "fd_skip": ["scale"]},
    {"id": "dclw", "name": "dclw", "params": {}, "fd_skip": ["scale", "features"]},
    {"id": "dclw_unguarded", "name": "dclw", "params": {"temperature_guard": False}, "fd_skip": ["features"]},
    {"id": "decoupled_softmax", "name": "decoupled_softmax", "params": {}, "meta": {"labels": True}},
    {"id": "align_uniform", "name": "align_uniform", "params": {"cross_uniformity": True}},
    {"id": "cwcl", "name": "cwcl", "params": {}},
    {"id": "cwcl_sharp_asym", "name": "cwcl", "params": {"weight_temperature": 0.1, "symmetric": False}},
    {"id": "multihead", "name": "multihead", "params": {"num_heads": 2}},
    {"id": "multihead_tiled", "name": "multihead", "params": {"num_heads": 2, "tiled": True, "tile_size": 3}},
    {"id": "hard_negative_mixing", "name": "hard_negative_mixing",
     "params": {"num_hard": 3, "num_mix": 2, "num_query_mix": 2, "warmup_steps": 2},
     "meta": {"labels": True, "step": 3}, "fd_skip": ["features"]},
    {"id": "symile", "name": "symile", "params": {}, "meta": {"step": 1}},
    {"id": "gram", "name": "gram", "params": {"modalities": ["text", "image", "audio"]}},
    {"id": "mw_auc", "name": "mw_auc", "params": {}},
    {"id": "mw_auc_labels", "name": "mw_auc", "params": {}, "meta": {"labels": True}},
    {"id": "sdm", "name": "sdm", "params": {}, "meta": {"labels": True}},
]


def case_meta(case: dict, n: int) -> dict:
    meta = dict(case.get("meta", {}))
    if meta.pop("labels", False):
        meta["labels"] = make_labels(n)
    return meta


def make_labels(n: int, classes: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def build_case(case: dict):
    """The loss module, its leaf log scale and bias (initialised from the config as the trainer does)."""
    fn = L.build(case["name"], **case["params"])
    log_scale = scalar_leaf(math.log(1 / fn.cfg.temperature_init))
    return fn, log_scale, scalar_leaf(fn.cfg.bias_init)


def scalar_leaf(v: float | None, dtype=torch.float32):
    return None if v is None else torch.tensor(float(v), dtype=dtype, requires_grad=True)


def leaves(loss_fn, feats, log_scale, bias):
    ls = [*feats.values(), log_scale]
    if bias is not None:
        ls.append(bias)
    return ls + [p for p in loss_fn.parameters() if p.requires_grad]


@dataclass
class Tolerance:
    """assert_close tolerances of a parity check: an absolute one per named term and per gradient leaf (in the
    order of `leaves`; `atol` for any not listed), and one relative one."""

    atol: float
    rtol: float
    terms: dict[str, float] = field(default_factory=dict)
    grads: list[float] = field(default_factory=list)

    def term(self, key: str) -> float:
        return self.terms.get(key, self.atol)

    def grad(self, i: int) -> float:
        return self.grads[i] if i < len(self.grads) else self.atol


def one_process(loss_fn, feats, log_scale, bias, meta: dict[str, Any]):
    """The whole batch on one process: (terms, gradients w.r.t. every leaf)."""
    xs = leaves(loss_fn, feats, log_scale, bias)
    out = loss_fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, rank=0, world_size=1, **meta)
    return out, torch.autograd.grad(out["loss"], xs, allow_unused=True)


def rank_mean(loss_fn, feats, log_scale, bias, world: int, meta: dict[str, Any], ranks=None):
    """The mean over `world` simulated ranks (same gathered leaves): (terms, gradients w.r.t. every leaf).
    `ranks` overrides the rank each of them is told it is (to simulate a wrong split)."""
    xs = leaves(loss_fn, feats, log_scale, bias)
    parts = [loss_fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, rank=r, world_size=world, **meta)
             for r in (ranks if ranks is not None else range(world))]
    mean = {k: sum(p[k] for p in parts) / world for k in parts[0]}
    return mean, torch.autograd.grad(mean["loss"], xs, allow_unused=True)


def fp32_tolerance(loss_fn, feats, log_scale, bias, meta: dict[str, Any], atol=1e-6, rtol=1e-5, multiple=8.0):
    """Tolerances for comparing two fp32 computations of the loss that sum in different orders.

    Rounding error depends on the summation order the BLAS picks (blocking, threads, vector width), so a fixed
    atol holds on one machine and fails on another. The one-process fp32 computation's own error, measured against
    the same computation in fp64, says how large that error is for this loss and these inputs; the rank split is a
    second computation with an error of the same size, so two of them differ by up to about twice it. `multiple`
    leaves headroom over that; the bound never goes below `atol` (nor the relative `rtol`)."""
    terms32, grads32 = one_process(loss_fn, feats, log_scale, bias, meta)
    wide = copy.deepcopy(loss_fn).double()
    feats64 = {m: f.detach().double().requires_grad_() for m, f in feats.items()}
    ls64 = log_scale.detach().double().requires_grad_()
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    terms64, grads64 = one_process(wide, feats64, ls64, bias64, meta)

    def err(a, b) -> float:
        if a is None or b is None:
            return 0.0
        return float((a.detach().double() - b.detach()).abs().max())

    return Tolerance(atol, rtol, {k: max(atol, multiple * err(terms32[k], terms64[k])) for k in terms32},
                     [max(atol, multiple * err(a, b)) for a, b in zip(grads32, grads64)])


def parity_excess(split, full, tol: Tolerance) -> float:
    """The largest |split - full| / (atol + rtol |full|) over every term and every gradient element: <= 1 is what
    assert_close accepts."""
    (terms_s, grads_s), (terms_f, grads_f) = split, full
    worst = 0.0
    pairs = [(terms_s[k], terms_f[k], tol.term(k)) for k in terms_f]
    pairs += [(a, b, tol.grad(i)) for i, (a, b) in enumerate(zip(grads_s, grads_f))]
    for a, b, atol in pairs:
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        a, b = a.detach(), b.detach()
        worst = max(worst, float(((a - b).abs() / (atol + tol.rtol * b.abs())).max()))
    return worst


def split_parity(loss_fn, feats, log_scale, bias, world: int, meta: dict[str, Any], atol=1e-6, rtol=1e-5):
    """Mean over `world` simulated ranks (same gathered leaves) == one process on the whole batch, in the loss, in
    every named term, and in the gradients w.r.t. every leaf. `atol` is a number or a Tolerance (then its own rtol
    applies)."""
    tol = atol if isinstance(atol, Tolerance) else Tolerance(atol, rtol)
    full, g_full = one_process(loss_fn, feats, log_scale, bias, meta)
    mean, g_split = rank_mean(loss_fn, feats, log_scale, bias, world, meta)
    for k in full:
        torch.testing.assert_close(mean[k], full[k], atol=tol.term(k), rtol=tol.rtol,
                                   msg=lambda m: f"term {k}: {m}")
    for i, (a, b) in enumerate(zip(g_split, g_full)):
        if a is None or b is None:
            assert (a is None or a.abs().max() < tol.grad(i)) and (b is None or b.abs().max() < tol.grad(i)), \
                f"leaf {i}"
            continue
        torch.testing.assert_close(a, b, atol=tol.grad(i), rtol=tol.rtol, msg=lambda m: f"grad of leaf {i}: {m}")
    return full, g_full


def naive_infonce(q: torch.Tensor, k: torch.Tensor, t: float, eps: float = 0.0, bias: float = 0.0) -> float:
    """Mean over rows of CE with label smoothing, by explicit loops in float64."""
    n = q.shape[0]
    qd, kd = q.double().tolist(), k.double().tolist()
    total = 0.0
    for i in range(n):
        z = [t * sum(a * b for a, b in zip(qd[i], kd[j])) + bias for j in range(n)]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        logp = [v - lse for v in z]
        total += -(1 - eps) * logp[i] - eps / n * sum(logp)
    return total / n


def fd_grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central finite differences of scalar f at x (float64)."""
    x = x.detach().clone()
    g = torch.zeros_like(x)
    flat, gf = x.view(-1), g.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        with torch.no_grad():
            flat[i] = old + h
            fp = float(f(x))
            flat[i] = old - h
            fm = float(f(x))
            flat[i] = old
        gf[i] = (fp - fm) / (2 * h)
    return g


# ---------------------------------------------------------------------------------------------------------------
# Real multi-process parity: `gloo_worker` runs in every spawned process (it must live in an importable module).

def _case_inputs(case: dict, n: int, d_in: int, d: int):
    """Global inputs, identical encoders per modality, labels: the same on every rank (seeded)."""
    torch.manual_seed(case.get("seed", 0))
    mods = L.build(case["name"], **case["params"]).cfg.modalities
    xs = {m: torch.randn(n, d_in) for m in mods}
    encs = {m: torch.nn.Linear(d_in, d) for m in mods}
    return mods, xs, encs, make_labels(n)


def _case_grads(case, rank: int, world: int, n: int = 8, d_in: int = 6, d: int = 6):
    """Loss and parameter gradients of one rank's step: local rows -> encoders -> gather with grad -> loss."""
    from towerlab.losses.gather import all_gather_with_grad, gather_no_grad

    mods, xs, encs, labels = _case_inputs(case, n, d_in, d)
    fn = L.build(case["name"], **case["params"])
    cfg = fn.cfg
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.temperature_init)))
    bias = torch.nn.Parameter(torch.tensor(cfg.bias_init)) if cfg.bias_init is not None else None
    b = n // world
    rows = slice(rank * b, (rank + 1) * b)
    local = {m: F.normalize(encs[m](xs[m][rows]), dim=-1) for m in mods}
    if world == 1:  # the single-process reference, run inside a 2-process group: no collective
        all_gather_with_grad = gather_no_grad = lambda t: t  # noqa: E731
    gathered = {m: all_gather_with_grad(f) for m, f in local.items()}
    meta = case_meta(case, n)
    if "labels" in meta:  # what the trainer does: gather this rank's labels
        meta["labels"] = gather_no_grad(labels[rows])
    out = fn(gathered, logit_scale=log_scale.exp(), logit_bias=bias, rank=rank, world_size=world, **meta)
    out["loss"].backward()
    params = [p for m in mods for p in encs[m].parameters()] + [log_scale] + ([bias] if bias is not None else [])
    params += list(fn.parameters())
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    terms = {k: v.detach().clone() for k, v in out.items()}
    return terms, grads


def _feature_cache_grads(rank: int, world: int, k: int, n: int = 16, name: str = "clip"):
    """Parameter gradients of one rank's feature-cache step: its n/world rows in k micro-batches, the loss over
    all ranks' rows (gathered with grad inside loss_fn)."""
    from towerlab.losses.feature_cache import feature_cache_backward
    from towerlab.losses.gather import all_gather_with_grad, gather_no_grad

    mods, xs, encs, labels = _case_inputs({"name": name, "params": {}, "seed": 3}, n, 6, 6)
    fn = L.build(name)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / fn.cfg.temperature_init)))
    b = n // world
    rows = slice(rank * b, (rank + 1) * b)
    m = b // k
    chunks = [{mod: xs[mod][rows][i * m : (i + 1) * m] for mod in mods} for i in range(k)]
    gather = all_gather_with_grad if world > 1 else (lambda t: t)
    gather_labels = gather_no_grad if world > 1 else (lambda t: t)
    feature_cache_backward(
        encode_fn=lambda c: {mod: F.normalize(encs[mod](c[mod]), dim=-1) for mod in mods},
        micro_batches=chunks,
        loss_fn=lambda f: fn({mod: gather(v) for mod, v in f.items()}, logit_scale=log_scale.exp(),
                             rank=rank, world_size=world, labels=gather_labels(labels[rows])),
        params=[log_scale],
    )
    return [p.grad.clone() for mod in mods for p in encs[mod].parameters()] + [log_scale.grad.clone()]


def gloo_worker(rank: int, world: int, port: int, out_path: str, cases: list) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for case in cases:
            terms, grads = _case_grads(case, rank, world)
            for t in list(terms.values()) + grads:  # the trainer averages over ranks
                dist.all_reduce(t)
                t /= world
            ref_terms, ref_grads = _case_grads(case, 0, 1) if rank == 0 else (terms, grads)
            results[case["id"]] = {
                "loss": [terms["loss"].item(), ref_terms["loss"].item()],
                "term_diff": max(abs((terms[k] - ref_terms[k]).item()) for k in ref_terms),
                "grad_diff": max((a - r).abs().max().item() for a, r in zip(grads, ref_grads)),
                "grad_norm": sum(r.norm().item() for r in ref_grads),
            }
        # Feature-cache accumulation across real ranks: 2 ranks x 2 micro-batches == one process, one batch.
        for name in ("clip", "sdm"):
            grads = _feature_cache_grads(rank, world, k=2, name=name)
            for g in grads:
                dist.all_reduce(g)
                g /= world
            ref = _feature_cache_grads(0, 1, k=1, name=name) if rank == 0 else grads
            results[f"feature_cache_{name}"] = {
                "loss": [0.0, 0.0], "term_diff": 0.0,
                "grad_diff": max((a - r).abs().max().item() for a, r in zip(grads, ref)),
                "grad_norm": sum(r.norm().item() for r in ref),
            }
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path + ".tmp", "w") as fh:
            json.dump(results, fh)
        os.replace(out_path + ".tmp", out_path)
