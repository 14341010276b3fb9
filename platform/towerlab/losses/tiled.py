"""Memory-efficient tiled kernels (Inf-CL style, reference/losses.md §12.1): the logit matrix is never held whole.

Two autograd Functions work over tiles of the N x N logit matrix Z = t x y^T (+ b), for this rank's band of rows
R = [lo, hi) (its local rows; and, for the symmetric loss, its local columns):

- `BandInfoNCE`: per-row InfoNCE losses in both directions,
      l_r[i] = log sum_j exp(Z_ij) - c_i Z_ii   (i in R, x -> y)     l_c[j] = log sum_i exp(Z_ij) - c_j Z_jj   (j in R)
  optionally with the diagonal left out of the sums (DCL); c is a per-row constant (1 - label smoothing, DCLW's
  weights, 0 for bare log-sum-exps). A tile that meets the row band and the column band feeds both accumulators,
  so at world size 1 forward + backward cost 4 matmuls of N x N x d: the forward product and, in backward, its
  recomputation, dx_I += t G y_J and dy_J += t G^T x_I, with G = exp(Z - lse_r) g_r + exp(Z - lse_c) g_c per tile
  and the positives' -c (g_r + g_c) added on the diagonal.
- `BandSigmoid`: SigLIP's totals over the band of sum_{j != i} softplus(Z_ij) and softplus(-Z_ii). Its gradient
  sigmoid(Z) needs nothing computed later, so the forward pass accumulates it from the same tiles: 3 matmuls,
  nothing recomputed.

For InfoNCE only the inputs and per-row vectors are kept and tiles are recomputed in backward. The positives are read from the
diagonal tiles, so no [N, d] product is formed for them. The scale t and bias b enter the GEMM itself (addmm's alpha
and a prefilled output), and d/dt = <dx_raw, x> is formed once at the end, so no scaled copy of the features is
made. Extra memory: two tile buffers plus the two [N, d] gradients.

Numerics. The accumulation dtype is fp32 (fp64 inputs stay fp64) whatever the input dtype. The general path merges a
max-shifted tile log-sum-exp into the running one with logaddexp: exact for any scale. When |Z| <= U = t max|x_i|
max|y_j| <= 40 (t <= 40 for unit vectors, e.g. CLIP's initial 1/0.07), no shift is needed at all: every exp(Z)
lies in [e^-40, e^40], a normal fp32 number, and so do the sums (N e^40 << 3e38), so one exp per element serves the
rows and the columns in forward, and G = exp(Z) (alpha_i + beta_j), alpha_i = g_r,i exp(-lse_r,i), beta_j = g_c,j
exp(-lse_c,j), needs one exp per element in backward: half the general path's transcendental work.

Tiles are `tile x tile`; batch sizes that are not a multiple of the tile size get smaller edge tiles.
`tiled_symmetric_infonce` and `tiled_sigmoid` are the entry points the families call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from towerlab.losses.base import acc, host_float

UNSHIFTED_MAX_LOGIT = 40.0  # the unshifted path needs every exp(Z), Z in [-U, U], to be a normal fp32 number

Block = tuple[int, int]


def _blocks(n: int, lo: int, hi: int, size: int) -> list[Block]:
    """[0, n) cut into chunks of at most `size` that never straddle lo or hi (so a chunk is in or out of the band)."""
    out = []
    for a, b in ((0, lo), (lo, hi), (hi, n)):
        out += [(s, min(s + size, b)) for s in range(a, b, size)]
    return out


def _diag(i: Block, j: Block, device: torch.device) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(tile rows, tile columns, global indices) of the global-diagonal entries of tile (I, J), or None."""
    a, b = max(i[0], j[0]), min(i[1], j[1])
    if a >= b:
        return None
    k = torch.arange(a, b, device=device)
    return k - i[0], k - j[0], k


class _Tiles:
    """The tile loop both kernels share: inputs in the accumulation dtype, the scale, two scratch buffers, and the
    (row block, column block) pairs that meet the band. Every buffer is made on the inputs' device."""

    def __init__(self, x: Tensor, y: Tensor, scale: Tensor, lo: int, hi: int, tile: int, cols_in_band: bool):
        self.x, self.y = acc(x.detach()), acc(y.detach())
        self.t = host_float(scale)  # addmm's alpha is a number: one host sync per call
        self.lo, self.hi = lo, hi
        n = self.x.shape[0]
        self.device = self.x.device
        self.buf = [torch.empty(min(tile, n) ** 2, dtype=self.x.dtype, device=self.device) for _ in range(2)]
        blocks = _blocks(n, lo, hi, tile)
        self.pairs = [
            (i, j, lo <= i[0] < hi, cols_in_band and lo <= j[0] < hi)
            for i in blocks
            for j in blocks
            if lo <= i[0] < hi or (cols_in_band and lo <= j[0] < hi)
        ]

    def vec(self, fill: float = 0.0) -> Tensor:
        return torch.full((self.hi - self.lo,), fill, dtype=self.x.dtype, device=self.device)

    def diag(self, i: Block, j: Block) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        return _diag(i, j, self.device)

    def logits(self, i: Block, j: Block, bias: float = 0.0) -> Tensor:
        """Z_IJ = t x_I y_J^T + bias, written into scratch buffer 0 by one GEMM."""
        z = self.buf[0][: (i[1] - i[0]) * (j[1] - j[0])].view(i[1] - i[0], j[1] - j[0])
        if bias:
            z.fill_(bias)
        return torch.addmm(z, self.x[i[0] : i[1]], self.y[j[0] : j[1]].T, beta=1 if bias else 0, alpha=self.t, out=z)

    def scratch(self, like: Tensor) -> Tensor:
        return self.buf[1][: like.numel()].view_as(like)

    def band(self, v: Tensor, blk: Block) -> Tensor:
        return v[blk[0] - self.lo : blk[1] - self.lo]

    def accumulate(self, g: Tensor, i: Block, j: Block, dx: Tensor, dy: Tensor) -> None:
        """dx_I += G y_J and dy_J += G^T x_I (unscaled: the factor t is applied once at the end)."""
        dx[i[0] : i[1]].addmm_(g, self.y[j[0] : j[1]])
        dy[j[0] : j[1]].addmm_(g.T, self.x[i[0] : i[1]])

    def grads(self, dx: Tensor, dy: Tensor, x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """d/dx = t dx_raw, d/dy = t dy_raw, d/dt = <dx_raw, x> (= sum over tiles of G * x y^T)."""
        dt = torch.dot(dx.reshape(-1), self.x.reshape(-1))
        return dx.mul_(self.t).to(x.dtype), dy.mul_(self.t).to(y.dtype), dt.to(scale.dtype).reshape(scale.shape)


class BandInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, pos_coef, lo: int, hi: int, tile: int, exclude_diag: bool):  # type: ignore[override]
        tl = _Tiles(x, y, scale, lo, hi, tile, cols_in_band=True)
        u = abs(tl.t) * host_float(tl.x.norm(dim=1).max()) * host_float(tl.y.norm(dim=1).max())
        fixed = u <= UNSHIFTED_MAX_LOGIT  # no shift needed (see Numerics)
        # fixed: running sums of exp(Z), lse = log(sum); general: running log-sum-exps
        s_r, s_c = (tl.vec(), tl.vec()) if fixed else (tl.vec(-math.inf), tl.vec(-math.inf))
        z_pos = tl.vec()
        for i, j, row, col in tl.pairs:
            z = tl.logits(i, j)
            d = tl.diag(i, j)
            if d is not None:
                z_pos[d[2] - lo] = z[d[0], d[1]]
                if exclude_diag:
                    z[d[0], d[1]] = -math.inf
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
        lse_r, lse_c = (s_r.log_(), s_c.log_()) if fixed else (s_r, s_c)
        coef = acc(pos_coef.detach())
        ctx.save_for_backward(x, y, scale, coef, lse_r, lse_c)
        ctx.args = (lo, hi, tile, exclude_diag, fixed)
        return lse_r - coef * z_pos, lse_c - coef * z_pos

    @staticmethod
    def backward(ctx, g_r, g_c):  # type: ignore[override]
        x, y, scale, coef, lse_r, lse_c = ctx.saved_tensors
        lo, hi, tile, exclude_diag, fixed = ctx.args
        tl = _Tiles(x, y, scale, lo, hi, tile, cols_in_band=True)
        g_r = torch.zeros_like(lse_r) if g_r is None else acc(g_r)
        g_c = torch.zeros_like(lse_c) if g_c is None else acc(g_c)
        g_pos = coef * (g_r + g_c)
        dx, dy = torch.zeros_like(tl.x), torch.zeros_like(tl.y)
        if fixed:
            alpha, beta = g_r * torch.exp(-lse_r), g_c * torch.exp(-lse_c)
        for i, j, row, col in tl.pairs:
            z = tl.logits(i, j)
            d = tl.diag(i, j)
            if exclude_diag and d is not None:
                z[d[0], d[1]] = -math.inf
            if fixed:  # G = exp(Z) * (alpha_i + beta_j)
                coefs = tl.scratch(z).zero_()
                if row:
                    coefs.add_(tl.band(alpha, i)[:, None])
                if col:
                    coefs.add_(tl.band(beta, j)[None, :])
                g = z.exp_().mul_(coefs)
            else:
                g = None
                if col:  # exp(Z - lse_c) g_c into the scratch buffer, before Z is overwritten
                    g = torch.sub(z, tl.band(lse_c, j)[None, :], out=tl.scratch(z)).exp_().mul_(tl.band(g_c, j)[None, :])
                if row:
                    p = z.sub_(tl.band(lse_r, i)[:, None]).exp_().mul_(tl.band(g_r, i)[:, None])
                    g = p if g is None else g.add_(p)
            if d is not None:
                g[d[0], d[1]] -= g_pos[d[2] - lo]
            tl.accumulate(g, i, j, dx, dy)
        return (*tl.grads(dx, dy, x, y, scale), None, None, None, None, None)


class BandSigmoid(torch.autograd.Function):
    """Returns the band's totals (sum over rows i in R of sum_{j != i} softplus(Z_ij), and of softplus(-Z_ii)).

    SigLIP has no normalisation, so d total / dZ = sigmoid(Z) does not depend on anything computed later: with
    grad enabled, the forward pass also accumulates the raw gradients (dx_raw = sigmoid(Z) y, dy_raw =
    sigmoid(Z)^T x, sum sigmoid(Z)) from the same tile, and backward only scales them by the incoming scalars.
    That is 3 matmuls instead of 4 and no recomputation, for the same O(N d) gradient memory."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, lo: int, hi: int, tile: int):  # type: ignore[override]
        tl = _Tiles(x, y, scale, lo, hi, tile, cols_in_band=False)
        want_grad = any(ctx.needs_input_grad[:4])
        neg, z_pos = torch.zeros((), dtype=tl.x.dtype, device=tl.device), tl.vec()
        dx = torch.zeros_like(tl.x) if want_grad else None
        dy = torch.zeros_like(tl.y) if want_grad else None
        db = torch.zeros((), dtype=tl.x.dtype, device=tl.device)
        for i, j, _, _ in tl.pairs:
            z = tl.logits(i, j, host_float(bias))
            d = tl.diag(i, j)
            if d is not None:
                z_pos[d[2] - lo] = z[d[0], d[1]]
                z[d[0], d[1]] = -math.inf
            neg += torch.nn.functional.softplus(z).sum()
            if want_grad:
                g = z.sigmoid_()
                db += g.sum()
                tl.accumulate(g, i, j, dx, dy)
        ctx.save_for_backward(x, y, scale, bias, z_pos, *((dx, dy, db) if want_grad else ()))
        ctx.args = (lo, hi)
        return neg, torch.nn.functional.softplus(-z_pos).sum()

    @staticmethod
    def backward(ctx, g_neg, g_pos):  # type: ignore[override]
        if ctx.args is None:  # the saved gradients are scaled in place (no second [N, d] copy)
            raise RuntimeError("BandSigmoid: backward ran twice; recompute the loss instead of retain_graph")
        x, y, scale, bias, z_pos, dx, dy, db = ctx.saved_tensors
        (lo, hi), ctx.args = ctx.args, None
        xa, ya = acc(x.detach()), acc(y.detach())
        g_neg = host_float(g_neg) if g_neg is not None else 0.0
        g_pos = host_float(g_pos) if g_pos is not None else 0.0
        # d softplus(-z_ii) / dz_ii = -sigmoid(-z_ii): the positives' gradient on the diagonal, added in place.
        p = torch.sigmoid(-z_pos).mul_(-g_pos)
        dx, dy = dx.mul_(g_neg), dy.mul_(g_neg)
        dx[lo:hi].addcmul_(ya[lo:hi], p[:, None])
        dy[lo:hi].addcmul_(xa[lo:hi], p[:, None])
        t = host_float(scale)
        dt = torch.dot(dx.reshape(-1), xa.reshape(-1))  # includes the diagonal's p_i x_i.y_i
        db_total = g_neg * db + p.sum()
        return (dx.mul_(t).to(x.dtype), dy.mul_(t).to(y.dtype), dt.to(scale.dtype).reshape(scale.shape),
                db_total.to(bias.dtype).reshape(bias.shape), None, None, None)


def band_infonce(x: Tensor, y: Tensor, scale: Tensor, rows: slice, tile: int, pos_coef: Optional[Tensor] = None,
                 exclude_diag: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row (x-to-y, y-to-x) losses of this rank's rows: log-sum-exp of t x_i y^T (resp. t y_i x^T) minus
    pos_coef_i t x_i.y_i (pos_coef defaults to 1: plain InfoNCE; pass zeros for bare log-sum-exps)."""
    t = acc(scale)
    coef = torch.ones(rows.stop - rows.start, dtype=t.dtype, device=x.device) if pos_coef is None else pos_coef
    return BandInfoNCE.apply(x, y, t, coef, rows.start, rows.stop, tile, exclude_diag)


def tiled_symmetric_infonce(
    x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], rows: slice, eps: float, tile: int
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE with label smoothing eps, equal to the full-matrix version (clip.py). A logit bias cancels
    in every softmax and is ignored. CE with smoothing = LSE - (1-eps) z_ii - eps mean_j z_ij, and
    mean_j z_ij = t x_i . mean(y), so smoothing costs O(N d)."""
    t = acc(scale)
    coef = torch.full((rows.stop - rows.start,), 1.0 - eps, dtype=t.dtype, device=x.device)
    l_xy, l_yx = band_infonce(x, y, t, rows, tile, coef)
    if eps:
        xa, ya = acc(x), acc(y)
        l_xy = l_xy - eps * t * (xa[rows] @ ya.mean(dim=0))
        l_yx = l_yx - eps * t * (ya[rows] @ xa.mean(dim=0))
    return l_xy.mean(), l_yx.mean()


def tiled_sigmoid(x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], rows: slice, tile: int) -> tuple[Tensor, Tensor]:
    """SigLIP terms, means over local rows: positives softplus(-z_ii) and negatives sum_{j != i} softplus(z_ij)."""
    t = acc(scale)
    b = torch.zeros((), dtype=t.dtype, device=x.device) if bias is None else acc(bias)
    neg, pos = BandSigmoid.apply(x, y, t, b, rows.start, rows.stop, tile)
    nb = rows.stop - rows.start
    return pos / nb, neg / nb
