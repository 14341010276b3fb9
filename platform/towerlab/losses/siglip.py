"""SigLIP: the pairwise sigmoid loss (reference/losses.md §2).

    L = -1/N sum_i sum_j log sigmoid(z_ij (t s_ij + b)),   z_ii = +1, z_ij = -1 (i != j)

i.e. per row softplus(-l_ii) + sum_{j != i} softplus(l_ij) with l = t s + b, normalised by the number of positives
per row (one). Defaults as the paper: t = 10 (temperature_init 0.1) and b = -10, so that the N-1 negatives do not
dominate the first steps. A rank sums its local rows against all columns and divides by its b rows, so the mean
over ranks is the full-batch loss. Written with softplus (never log(sigmoid)); with `tiled=True` the negatives come
from the tiled kernel (towerlab.losses.tiled) and never form the N x N matrix. Without a logit bias, b = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, diag_mask, logits


@dataclass
class SiglipConfig(LossConfig, temperature_init=0.1, bias_init=-10.0):  # the paper's t = 10, b = -10
    name: str = "siglip"
    """The loss family: siglip."""


@LOSSES.register("siglip", config=SiglipConfig)
class SiglipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss with a learnable bias (SigLIP)."""

    supports_tiled = True
    uses_bias = True
    one_logit_matrix = True

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        if self.cfg.tiled:
            from towerlab.losses.tiled import tiled_sigmoid

            pos, neg = tiled_sigmoid(x, y, scale, bias, rows, self.cfg.tile_size)
        else:
            z = logits(x[rows], y, scale, bias)
            diag = diag_mask(rows, z.shape[1], z.device)
            pos = F.softplus(-z.diagonal(rows.start)).mean()  # (k, rows.start + k): no data-dependent indexing
            neg = F.softplus(z.masked_fill(diag, float("-inf"))).sum(dim=1).mean()
        return {"loss": pos + neg, "loss_pos": pos, "loss_neg": neg}
