"""SDM: similarity distribution matching (IRRA, Jiang & Ye, CVPR 2023), multi-positive.

    p_ij = softmax_j(t s_ij),   q_ij = y_ij / sum_j y_ij   (y_ij = 1 when i and j share a label or identity)
    L_dir = 1/N sum_i KL(p_i || q_i) = 1/N sum_i sum_j p_ij (log p_ij - log(q_ij + epsilon))

in both directions (x queries against y, and y against x), SUMMED as in IRRA. The KL is taken against the label
distribution made strictly positive by epsilon (IRRA's 1e-8): without it KL(p || q) is infinite whenever a
non-matching pair has any probability, so epsilon sets how hard non-matches are pushed (log(1e-8) = -18.4 per unit
of probability mass). The mean over query rows (IRRA's) instead of the sum keeps the scale independent of N and the
per-rank means exact. Positives: meta `labels` (identity ids), else `pos_mask`, else the diagonal. IRRA's logit
scale is 50 (temperature_init 0.02).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from towerlab.config.checks import num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, both_directions, direction_names, logits
from towerlab.losses.base import positive_mask


@dataclass
class SdmConfig(LossConfig, temperature_init=0.02):  # IRRA's logit scale 50
    name: str = "sdm"
    """The loss family: sdm."""
    epsilon: float = num(1e-8, gt=0)
    """Added to the label distribution so the KL stays finite; sets how hard non-matches are pushed (IRRA: 1e-8), > 0.
    """


@LOSSES.register("sdm", config=SdmConfig)
class SdmLoss(ContrastiveLoss):
    """Similarity distribution matching: KL(softmax(t s) || normalised same-id labels), both directions."""

    needs_labels = True
    multi_positive = True

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        pos = positive_mask(x.shape[0], meta, x.device)
        eps = self.cfg.epsilon

        def direction(q: Tensor, k: Tensor, rows: slice, p: Tensor) -> Tensor:
            logp = torch.log_softmax(logits(q[rows], k, scale), dim=1)
            target = p.to(logp.dtype) / p.sum(dim=1, keepdim=True)
            log_target = torch.log(target + eps)
            return (logp.exp() * (logp - log_target)).sum(dim=1).mean()

        l_xy, l_yx = both_directions(direction, x, y, rows, pos)
        n_xy, n_yx = direction_names(self.cfg.modalities)
        return {"loss": l_xy + l_yx, n_xy: l_xy, n_yx: l_yx}
