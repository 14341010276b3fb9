"""The tiled kernels equal the full-matrix computation: loss and gradients w.r.t. features, logit scale and bias,
for batch sizes that are not multiples of the tile, for rank bands, on both numerical paths (the single-shift path
at moderate scale, the online log-sum-exp at t = 100), in fp32 to 1e-5 and in fp64 to 1e-10, with fp32 logits for
bf16 inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

import towerlab.losses as L
from towerlab.losses.tiled import _blocks, band_infonce

VARIANTS = [
    ("clip", {}),
    ("clip", {"label_smoothing": 0.1}),
    ("siglip", {}),
    ("dcl", {}),
    ("multihead", {"num_heads": 2}),
]


def run(name, params, x, y, t, b, rank, world, tiled, tile=4):
    fn = L.build(name, tiled=tiled, tile_size=tile, **params).to(x.dtype)
    leaves = [x, y, t] + ([b] if name == "siglip" else [])
    feats = {"image": x, "text": y}
    out = fn(feats, logit_scale=t.exp(), logit_bias=b if name == "siglip" else None, rank=rank, world_size=world)
    return out, torch.autograd.grad(out["loss"], leaves)


@pytest.mark.parametrize("name,params", VARIANTS, ids=[f"{n}{'_' + '_'.join(p) if p else ''}" for n, p in VARIANTS])
@pytest.mark.parametrize("scale", [10.0, 100.0])
@pytest.mark.parametrize("n,world,tile", [(10, 1, 4), (9, 1, 16), (12, 2, 5), (12, 3, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_tiled_equals_full(name, params, scale, n, world, tile, dtype, tol):
    g = torch.Generator().manual_seed(n * 7 + world)
    x = F.normalize(torch.randn(n, 8, generator=g, dtype=dtype), dim=1).requires_grad_()
    y = F.normalize(x.detach() + torch.randn(n, 8, generator=g, dtype=dtype), dim=1).requires_grad_()
    t = torch.tensor(math.log(scale), dtype=dtype, requires_grad=True)
    b = torch.tensor(-3.0, dtype=dtype, requires_grad=True)
    if name == "siglip" and dtype == torch.float64:
        tol = 1e-8  # torch's softplus (the reference) is linear above 20, its gradient 1 instead of sigmoid: 2e-9
    for r in range(world):
        full, g_full = run(name, params, x, y, t, b, r, world, tiled=False)
        tiled, g_tiled = run(name, params, x, y, t, b, r, world, tiled=True, tile=tile)
        # Relative to each quantity's scale: at t = 100 gradients are ~100x larger and so is fp32 rounding.
        for k in full:
            torch.testing.assert_close(tiled[k], full[k], atol=tol * max(1.0, full[k].abs().item()), rtol=tol)
        for a, c in zip(g_tiled, g_full):
            torch.testing.assert_close(a, c, atol=tol * max(1.0, c.abs().max().item()), rtol=tol)


def test_band_kernel_matches_logsumexp_both_paths():
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(11, 5, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(11, 5, generator=g, dtype=torch.float64), dim=1)
    for t in (5.0, 100.0):  # below and above the single-shift bound
        z, ts = t * x @ y.T, torch.tensor(t, dtype=torch.float64)
        zero = torch.zeros(5, dtype=torch.float64)
        r, c = band_infonce(x, y, ts, slice(3, 8), 3, zero)
        torch.testing.assert_close(r, torch.logsumexp(z[3:8], dim=1))
        torch.testing.assert_close(c, torch.logsumexp(z[:, 3:8], dim=0))
        # weighted positives, diagonal left out (DCLW's form)
        w = torch.linspace(0.5, 1.5, 11, dtype=torch.float64)
        off = z.masked_fill(torch.eye(11, dtype=torch.bool), float("-inf"))
        r, c = band_infonce(x, y, ts, slice(0, 11), 4, w, exclude_diag=True)
        torch.testing.assert_close(r, torch.logsumexp(off, dim=1) - w * z.diagonal())
        torch.testing.assert_close(c, torch.logsumexp(off, dim=0) - w * z.diagonal())


def test_large_scale_does_not_overflow():
    # t = 1000 exceeds any fp32 exp without max-shifting; the tiled LSE stays exact.
    x = F.normalize(torch.randn(6, 4), dim=1)
    out = L.build("clip", tiled=True, tile_size=4)({"image": x, "text": x}, logit_scale=torch.tensor(1000.0))
    ref = L.build("clip")({"image": x, "text": x}, logit_scale=torch.tensor(1000.0))
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-4, rtol=1e-5)


def test_bf16_inputs_use_fp32_logits_and_return_bf16_grads():
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    y = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    xb, yb = x.bfloat16().requires_grad_(), y.bfloat16().requires_grad_()
    fn = L.build("clip", tiled=True, tile_size=3)
    out = fn({"image": xb, "text": yb}, logit_scale=torch.tensor(50.0))
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    ref = L.build("clip")({"image": xb.detach().float(), "text": yb.detach().float()}, logit_scale=torch.tensor(50.0))
    torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-5, rtol=1e-6)


def test_blocks_respect_the_band():
    assert _blocks(10, 3, 7, 3) == [(0, 3), (3, 6), (6, 7), (7, 10)]
    assert _blocks(5, 0, 5, 16) == [(0, 5)]
