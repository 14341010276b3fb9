"""Decoupled softmax (DEXML, "Dual-Encoders for Extreme Multi-Label Classification", ICLR 2024;
reference/losses.md §4): InfoNCE for several positives per query.

    L = -1/N sum_i 1/|P_i| sum_{j in P_i} log [ e^{z_ij} / ( e^{z_ij} + sum_{k not in P_i} e^{z_ik} ) ],  z = t s

Each positive competes only with the negatives: the other positives are removed from its denominator, so
duplicates (the same caption for two images, two images of one class) are not pushed apart. Positives come from
meta `pos_mask` ([N, N] bool), else `labels` (same id), else the diagonal alone, in which case the loss is exactly
CLIP's InfoNCE. Applied in both directions (the y-to-x direction uses the transposed mask) and averaged.
Negatives are masked with -inf (not DEXML's -100, which is unsafe once t is large). Default tau = 0.05 (DEXML).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, both_directions, direction_names, logits, masked_lse
from towerlab.losses.base import positive_mask


@dataclass
class DecoupledSoftmaxConfig(LossConfig, temperature_init=0.05):
    name: str = "decoupled_softmax"
    """The loss family: decoupled_softmax."""


@LOSSES.register("decoupled_softmax", config=DecoupledSoftmaxConfig)
class DecoupledSoftmaxLoss(ContrastiveLoss):
    """DEXML decoupled softmax: multi-positive InfoNCE, each positive against the negatives only."""

    needs_labels = True
    multi_positive = True

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        pos = positive_mask(x.shape[0], meta, x.device)

        def direction(q: Tensor, k: Tensor, rows: slice, p: Tensor) -> Tensor:
            z = logits(q[rows], k, scale)
            neg = masked_lse(z, ~p)  # -inf when every column is positive: each term is then 0
            per_pos = torch.logaddexp(z, neg[:, None]) - z  # -log(e^z / (e^z + e^neg)), exact for any gap
            return ((per_pos * p).sum(dim=1) / p.sum(dim=1)).mean()

        l_xy, l_yx = both_directions(direction, x, y, rows, pos)
        n_xy, n_yx = direction_names(self.cfg.modalities)
        return {"loss": 0.5 * (l_xy + l_yx), n_xy: l_xy, n_yx: l_yx}
