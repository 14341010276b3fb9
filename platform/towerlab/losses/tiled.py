"""Memory-efficient tiled kernels (Inf-CL style, reference/losses.md §12.1): the logit matrix is never held whole.

Two autograd Functions work over tiles of the N x N logit matrix Z = t x y^T (+ b):

- `BandLSE`: for this rank's band of rows R = [lo, hi), the row log-sum-exps lse_r[i] = log sum_j exp(Z_ij)
  (i in R) and the column log-sum-exps lse_c[j] = log sum_i exp(Z_ij) (j in R), optionally leaving out the diagonal
  (DCL). Symmetric InfoNCE needs both. A tile that meets the row band and the column band feeds both accumulators,
  so at world size 1 forward + backward cost 4 matmuls of N x N x d: the forward product and, in backward, its
  recomputation, dx_I += t G y_J and dy_J += t G^T x_I, with G = exp(Z - lse_r) g_r + exp(Z - lse_c) g_c per tile.
- `BandSoftplus`: r[i] = sum_{j != i} softplus(Z_ij) for i in R (SigLIP's negatives; the positive term
  softplus(-z_ii) is O(N) and computed outside). Backward uses sigmoid; also 4 matmuls.

Only the inputs and the per-row vectors are kept; tiles are recomputed in backward. The scale t and bias b enter the
GEMM itself (addmm's alpha and beta), and d/dt = sum(dx_raw * x) / 1 is formed once at the end, so no scaled copy of
the features is made. Extra memory: two tile buffers plus the two [N, d] gradients.

Numerics. The accumulation dtype is fp32 (fp64 inputs stay fp64) whatever the input dtype. The general path merges
a max-shifted tile log-sum-exp into the running one with logaddexp: exact for any scale. When the logits are bounded
by |Z| <= U = t max|x_i| max|y_j| with 2U <= 80 (t <= 40 for unit vectors, i.e. CLIP's initial 1/0.07), a single
constant shift U is exact too: every exp(Z - U) lies in [e^-80, 1], a normal fp32 number, so one exp per element
serves the rows and the columns in forward, and G = exp(Z - U) (alpha_i + beta_j) with alpha_i = g_r,i exp(U -
lse_r,i), beta_j = g_c,j exp(U - lse_c,j) needs one exp per element in backward, half the general path's work.

Tiles are `tile x tile`; batch sizes that are not a multiple of the tile size get smaller edge tiles.
`tiled_symmetric_infonce` and `tiled_sigmoid` are the entry points the families call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from towerlab.losses.base import acc

FIXED_SHIFT_MAX = 40.0  # the single-shift path needs every logit in [-U, U] with exp(-2U) a normal fp32 number


def _blocks(n: int, lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """[0, n) cut into chunks of at most `size` that never straddle lo or hi (so a chunk is in or out of the band)."""
    out = []
    for a, b in ((0, lo), (lo, hi), (hi, n)):
        out += [(s, min(s + size, b)) for s in range(a, b, size)]
    return out


def _mask_diag(z: Tensor, i0: int, j0: int) -> None:
    """Set the entries of tile z (rows from i0, columns from j0) on the global diagonal to -inf."""
    a, b = max(i0, j0), min(i0 + z.shape[0], j0 + z.shape[1])
    if a < b:
        k = torch.arange(a, b)
        z[k - i0, k - j0] = float("-inf")


class _Tiles:
    """The tile loop shared by both kernels: the inputs in the accumulation dtype, the scale, two scratch buffers,
    and the (row block, column block) pairs that meet the band."""

    def __init__(self, x: Tensor, y: Tensor, scale: Tensor, lo: int, hi: int, tile: int, cols_in_band: bool):
        self.x, self.y = acc(x.detach()), acc(y.detach())
        self.t = float(scale)
        self.lo, self.hi = lo, hi
        n = self.x.shape[0]
        self.buf = [torch.empty(min(tile, n) ** 2, dtype=self.x.dtype) for _ in range(2)]
        blocks = _blocks(n, lo, hi, tile)
        self.pairs = [
            (i, j, lo <= i[0] < hi, cols_in_band and lo <= j[0] < hi)
            for i in blocks
            for j in blocks
            if lo <= i[0] < hi or (cols_in_band and lo <= j[0] < hi)
        ]

    def logits(self, i: tuple[int, int], j: tuple[int, int], shift: float = 0.0) -> Tensor:
        """Z_IJ - shift = t x_I y_J^T - shift, written into scratch buffer 0 by one GEMM."""
        z = self.buf[0][: (i[1] - i[0]) * (j[1] - j[0])].view(i[1] - i[0], j[1] - j[0])
        z.fill_(-shift)
        return torch.addmm(z, self.x[i[0] : i[1]], self.y[j[0] : j[1]].T, alpha=self.t, out=z)

    def scratch(self, like: Tensor) -> Tensor:
        return self.buf[1][: like.numel()].view_as(like)

    def band(self, v: Tensor, blk: tuple[int, int]) -> Tensor:
        return v[blk[0] - self.lo : blk[1] - self.lo]

    def accumulate(self, g: Tensor, i: tuple[int, int], j: tuple[int, int], dx: Tensor, dy: Tensor) -> None:
        """dx_I += G y_J and dy_J += G^T x_I (unscaled: the factor t is applied once at the end)."""
        dx[i[0] : i[1]].addmm_(g, self.y[j[0] : j[1]])
        dy[j[0] : j[1]].addmm_(g.T, self.x[i[0] : i[1]])

    def grads(self, dx: Tensor, dy: Tensor, x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """d/dx = t dx_raw, d/dy = t dy_raw, d/dt = sum(dx_raw * x) (= sum over tiles of G * x y^T)."""
        dt = (dx * self.x).sum()
        return dx.mul_(self.t).to(x.dtype), dy.mul_(self.t).to(y.dtype), dt.to(scale.dtype).reshape(scale.shape)


class BandLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, lo: int, hi: int, tile: int, exclude_diag: bool):  # type: ignore[override]
        tl = _Tiles(x, y, scale, lo, hi, tile, cols_in_band=True)
        u = abs(tl.t) * float(tl.x.norm(dim=1).max()) * float(tl.y.norm(dim=1).max())
        fixed = u <= FIXED_SHIFT_MAX
        nb = hi - lo
        if fixed:  # running sums of exp(Z - u); lse = u + log(sum)
            s_r, s_c = torch.zeros(nb, dtype=tl.x.dtype), torch.zeros(nb, dtype=tl.x.dtype)
        else:  # running log-sum-exps
            s_r, s_c = torch.full((nb,), -math.inf, dtype=tl.x.dtype), torch.full((nb,), -math.inf, dtype=tl.x.dtype)
        for i, j, row, col in tl.pairs:
            z = tl.logits(i, j, u if fixed else 0.0)
            if exclude_diag:
                _mask_diag(z, i[0], j[0])
            if fixed:
                z.exp_()
                if row:
                    tl.band(s_r, i).add_(z.sum(dim=1))
                if col:
                    tl.band(s_c, j).add_(z.sum(dim=0))
                continue
            if row:
                r = tl.band(s_r, i)
                torch.logaddexp(r, torch.logsumexp(z, dim=1), out=r)
            if col:
                c = tl.band(s_c, j)
                torch.logaddexp(c, torch.logsumexp(z, dim=0), out=c)
        lse_r, lse_c = (s_r.log_().add_(u), s_c.log_().add_(u)) if fixed else (s_r, s_c)
        ctx.save_for_backward(x, y, scale, lse_r, lse_c)
        ctx.args = (lo, hi, tile, exclude_diag, u, fixed)
        return lse_r, lse_c

    @staticmethod
    def backward(ctx, g_r, g_c):  # type: ignore[override]
        x, y, scale, lse_r, lse_c = ctx.saved_tensors
        lo, hi, tile, exclude_diag, u, fixed = ctx.args
        tl = _Tiles(x, y, scale, lo, hi, tile, cols_in_band=True)
        g_r = torch.zeros_like(lse_r) if g_r is None else acc(g_r)
        g_c = torch.zeros_like(lse_c) if g_c is None else acc(g_c)
        dx, dy = torch.zeros_like(tl.x), torch.zeros_like(tl.y)
        if fixed:  # G = exp(Z - u) * (alpha_i + beta_j)
            alpha, beta = g_r * torch.exp(u - lse_r), g_c * torch.exp(u - lse_c)
        for i, j, row, col in tl.pairs:
            z = tl.logits(i, j, u if fixed else 0.0)
            if exclude_diag:
                _mask_diag(z, i[0], j[0])
            if fixed:
                coef = tl.scratch(z).zero_()
                if row:
                    coef.add_(tl.band(alpha, i)[:, None])
                if col:
                    coef.add_(tl.band(beta, j)[None, :])
                g = z.exp_().mul_(coef)
            else:
                g = None
                if col:  # exp(Z - lse_c) g_c into the scratch buffer, before Z is overwritten
                    g = torch.sub(z, tl.band(lse_c, j)[None, :], out=tl.scratch(z)).exp_().mul_(tl.band(g_c, j)[None, :])
                if row:
                    p = z.sub_(tl.band(lse_r, i)[:, None]).exp_().mul_(tl.band(g_r, i)[:, None])
                    g = p if g is None else g.add_(p)
            tl.accumulate(g, i, j, dx, dy)
        return (*tl.grads(dx, dy, x, y, scale), None, None, None, None)


class BandSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, lo: int, hi: int, tile: int):  # type: ignore[override]
        tl = _Tiles(x, y, scale, lo, hi, tile, cols_in_band=False)
        b = float(bias)
        out = torch.zeros(hi - lo, dtype=tl.x.dtype)
        for i, j, _, _ in tl.pairs:
            z = tl.logits(i, j, -b)
            _mask_diag(z, i[0], j[0])
            tl.band(out, i).add_(torch.nn.functional.softplus(z).sum(dim=1))
        ctx.save_for_backward(x, y, scale, bias)
        ctx.args = (lo, hi, tile)
        return out

    @staticmethod
    def backward(ctx, g_r):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        lo, hi, tile = ctx.args
        tl = _Tiles(x, y, scale, lo, hi, tile, cols_in_band=False)
        b, g_r = float(bias), acc(g_r)
        dx, dy = torch.zeros_like(tl.x), torch.zeros_like(tl.y)
        db = torch.zeros((), dtype=tl.x.dtype)
        for i, j, _, _ in tl.pairs:
            z = tl.logits(i, j, -b)
            _mask_diag(z, i[0], j[0])
            g = z.sigmoid_().mul_(tl.band(g_r, i)[:, None])
            db += g.sum()
            tl.accumulate(g, i, j, dx, dy)
        return (*tl.grads(dx, dy, x, y, scale), db.to(bias.dtype).reshape(bias.shape), None, None, None)


def band_lse(x: Tensor, y: Tensor, scale: Tensor, rows: slice, tile: int, exclude_diag: bool = False):
    """(row LSE of t x[rows] y^T, column LSE of t x y[rows]^T), each [len(rows)], computed by tiles."""
    return BandLSE.apply(x, y, acc(scale), rows.start, rows.stop, tile, exclude_diag)


def tiled_symmetric_infonce(
    x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], rows: slice, eps: float, tile: int
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE with label smoothing eps, equal to the full-matrix version (clip.py). A logit bias cancels
    in every softmax and is ignored. CE with smoothing = LSE - (1-eps) z_ii - eps mean_j z_ij, and
    mean_j z_ij = t x_i . mean(y), so smoothing costs O(N d)."""
    t, xa, ya = acc(scale), acc(x), acc(y)
    lse_r, lse_c = band_lse(x, y, t, rows, tile)
    pos = t * (xa[rows] * ya[rows]).sum(dim=1)
    l_xy, l_yx = lse_r - (1 - eps) * pos, lse_c - (1 - eps) * pos
    if eps:
        l_xy = l_xy - eps * t * (xa[rows] @ ya.mean(dim=0))
        l_yx = l_yx - eps * t * (ya[rows] @ xa.mean(dim=0))
    return l_xy.mean(), l_yx.mean()


def tiled_sigmoid(x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], rows: slice, tile: int) -> tuple[Tensor, Tensor]:
    """SigLIP terms, means over local rows: positives softplus(-z_ii) and negatives sum_{j != i} softplus(z_ij)."""
    t, xa, ya = acc(scale), acc(x), acc(y)
    b = torch.zeros((), dtype=t.dtype) if bias is None else acc(bias)
    neg = BandSoftplus.apply(x, y, t, b, rows.start, rows.stop, tile)
    z_pos = t * (xa[rows] * ya[rows]).sum(dim=1) + b
    return torch.nn.functional.softplus(-z_pos).mean(), neg.mean()
