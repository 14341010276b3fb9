"""CLIP plus alignment and uniformity (Wang & Isola 2020), as added to CLIP in "It's Not a Modality Gap"
(Fahim et al. 2024; reference/losses.md §5).

    L_align   = 1/N sum_i ||x_i - y_i||^2
    L_unif(X) = log mean_{i != j} exp(-u ||x_i - x_j||^2)          (u = 2; the mean over i < j is the same)
    L_xunif   = log mean_{i != j} exp(-u ||x_i - y_j||^2)          (cross-modal uniformity)
    L = L_CLIP + w_a L_align + w_u (L_unif(X) + L_unif(Y)) / 2  [+ w_x L_xunif when cross_uniformity]

All weights default to 1 as in the reference code. Squared distances are formed as |a|^2 + |b|^2 - 2 a.b (no
sqrt, so no NaN gradient when two embeddings coincide) and the log-mean-exp as logsumexp - log(count).

Distributed: alignment is per pair (mean over local rows). Uniformity is the log of a mean over ALL pairs of the
gathered batch, which is not a mean of per-row terms, so every rank computes it whole (O(N^2 d) per rank): the
mean over ranks is then the full-batch value, and since the autograd all-gather sums each rank's gradient back to
the owners and the trainer averages over ranks, the gradient is exact too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from towerlab.config.checks import num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, acc, direction_names
from towerlab.losses.clip import ClipConfig, symmetric_infonce


@dataclass
class AlignUniformConfig(ClipConfig):
    name: str = "align_uniform"
    """The loss family: align_uniform."""
    align_weight: float = num(1.0, ge=0)
    """Weight w_a of the alignment term (mean squared distance of positive pairs), at least 0."""
    uniform_weight: float = num(1.0, ge=0)
    """Weight w_u of the uniformity term (mean of both modalities'), at least 0."""
    cross_uniformity: bool = False
    """Add the cross-modal uniformity term L_xunif (the CUAXU variant)."""
    cross_uniform_weight: float = num(1.0, ge=0)
    """Weight w_x of the cross-modal uniformity term, at least 0."""
    uniformity_t: float = num(2.0, gt=0)
    """The u in exp(-u d^2) of the uniformity terms, > 0."""


def sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared distances without sqrt."""
    a, b = acc(a), acc(b)
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T


def log_mean_exp_offdiag(z: Tensor) -> Tensor:
    """log mean_{i != j} exp(z_ij) of a square matrix."""
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    # masked to -inf rather than selected: no data-dependent shape (a host sync on a GPU)
    return torch.logsumexp(z.masked_fill(eye, float("-inf")).flatten(), dim=0) - math.log(n * (n - 1))


@LOSSES.register("align_uniform", config=AlignUniformConfig)
class AlignUniformLoss(ContrastiveLoss):
    """CLIP + alignment + uniformity, optionally + cross-modal uniformity."""

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        cfg, u = self.cfg, self.cfg.uniformity_t
        l_xy, l_yx = symmetric_infonce(x, y, scale, None, rows, cfg.label_smoothing)
        clip = 0.5 * (l_xy + l_yx)
        align = (acc(x[rows]) - acc(y[rows])).pow(2).sum(dim=1).mean()
        unif = 0.5 * (log_mean_exp_offdiag(-u * sq_dists(x, x)) + log_mean_exp_offdiag(-u * sq_dists(y, y)))
        loss = clip + cfg.align_weight * align + cfg.uniform_weight * unif
        n_xy, n_yx = direction_names(cfg.modalities)
        out = {"loss_clip": clip, n_xy: l_xy, n_yx: l_yx, "loss_align": align, "loss_unif": unif}
        if cfg.cross_uniformity:
            out["loss_xunif"] = log_mean_exp_offdiag(-u * sq_dists(x, y))
            loss = loss + cfg.cross_uniform_weight * out["loss_xunif"]
        return {"loss": loss, **out}
