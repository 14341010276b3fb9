"""DCL and DCLW: decoupled contrastive learning (Yeh et al. 2021; reference/losses.md §3), cross-modal form.

    L_DCL = 1/N sum_i [ -w_i t s_ii + log sum_{j != i} exp(t s_ij) ],  applied x->y and y->x, averaged

The positive is removed from the denominator. DCL has w_i = 1; DCLW weights positives by a von Mises-Fisher
factor w_i = 2 - N softmax_i(s_ii / sigma) over the whole gathered batch (the correct form, with the factor N; the
weights are detached). Intra-modal negatives are not added (CLIP-style cross-modal training).

Guard. With a learnable temperature DCL is unbounded below: once s_ii > max_{j != i} s_ij, t -> infinity drives
L -> -infinity. With `temperature_guard: true` (the default) the encoders get DCL's gradient at the current t, but
t itself gets the gradient of the coupled symmetric InfoNCE (positive back in the denominator, bounded below by 0)
on detached features: loss = DCL(x, y; sg(t)) + InfoNCE(sg(x), sg(y); t) - sg(InfoNCE(...)). The value reported is
DCL's; t then settles where InfoNCE would put it instead of running to the clamp. With `temperature_guard: false`
t gets DCL's own gradient (use with learn_temperature: false, as in the paper: tau = 0.1).

Tileable: with `tiled: true` the per-row losses come from the tiled kernel with the diagonal left out of the sums
(the weighted positives read from its diagonal tiles), and the guard's InfoNCE from the plain tiled kernel on
detached features (4 more GEMMs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from towerlab.config.checks import num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, acc, diag_mask, direction_names, logits, masked_lse
from towerlab.losses.clip import symmetric_infonce


@dataclass
class DclConfig(LossConfig, temperature_init=0.1):
    name: str = "dcl"
    """The loss family: dcl (or dclw)."""
    temperature_guard: bool = True
    """Let the logit scale learn from the coupled InfoNCE instead of DCL, which is unbounded below in it."""


@dataclass
class DclwConfig(DclConfig):
    name: str = "dclw"
    """The loss family: dclw."""
    sigma: float = num(0.5, gt=0)
    """Temperature of DCLW's von Mises-Fisher positive weights, > 0."""


def dclw_weights(x: Tensor, y: Tensor, sigma: float) -> Tensor:
    """w_i = 2 - N softmax_i(s_ii / sigma) over the gathered batch, detached: hard positives (low s_ii) weigh more."""
    s = (acc(x.detach()) * acc(y.detach())).sum(dim=1)
    return 2 - s.shape[0] * torch.softmax(s / sigma, dim=0)


class _Decoupled(ContrastiveLoss):
    supports_tiled = True

    def weights(self, x: Tensor, y: Tensor) -> Tensor | None:
        return None

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        guard = self.cfg.temperature_guard and scale.requires_grad
        t = scale.detach() if guard else scale
        w = self.weights(x, y)
        w_loc = None if w is None else w[rows]
        if self.cfg.tiled:
            from towerlab.losses.tiled import band_infonce

            coef = torch.ones(rows.stop - rows.start, dtype=acc(t).dtype, device=x.device) if w_loc is None else w_loc
            r_xy, r_yx = band_infonce(x, y, t, rows, self.cfg.tile_size, coef, exclude_diag=True)
        else:
            pos = acc(t) * (acc(x[rows]) * acc(y[rows])).sum(dim=1)
            wpos = pos if w_loc is None else w_loc * pos
            diag = diag_mask(rows, x.shape[0], x.device)
            r_xy = masked_lse(logits(x[rows], y, t), ~diag) - wpos
            r_yx = masked_lse(logits(y[rows], x, t), ~diag) - wpos
        l_xy, l_yx = r_xy.mean(), r_yx.mean()
        n_xy, n_yx = direction_names(self.cfg.modalities)
        out = {"loss": 0.5 * (l_xy + l_yx), n_xy: l_xy, n_yx: l_yx}
        if guard:
            a, b = symmetric_infonce(x.detach(), y.detach(), scale, None, rows, 0.0, self.cfg.tiled, self.cfg.tile_size)
            coupled = 0.5 * (a + b)
            out["loss"] = out["loss"] + (coupled - coupled.detach())
            out["loss_infonce_guard"] = coupled.detach()
        return out


@LOSSES.register("dcl", config=DclConfig)
class DclLoss(_Decoupled):
    """Decoupled contrastive loss (positive removed from the denominator), with a temperature guard."""


@LOSSES.register("dclw", config=DclwConfig)
class DclwLoss(_Decoupled):
    """Decoupled contrastive loss with von Mises-Fisher weighted positives."""

    def weights(self, x: Tensor, y: Tensor) -> Tensor:
        return dclw_weights(x, y, self.cfg.sigma)
