"""CLIP: symmetric InfoNCE with a learnable temperature (reference/losses.md §1).

    L = 1/2 [ 1/N sum_i -log softmax_j(t s_ij + b)[i]  +  1/N sum_j -log softmax_i(t s_ij + b)[j] ]

with s_ij = <x_i, y_j>, optional label smoothing eps (the target puts 1-eps on the positive and eps/N on every
column, as torch's cross_entropy does) and an optional logit bias b (accepted for uniformity with SigLIP; a
softmax is invariant to it, so its gradient is zero). A rank computes its local rows x_R against all y (image to
text) and its local rows y_R against all x (text to image). With `tiled=True` both directions come from one pass
of the tiled kernel (towerlab.losses.tiled), which never holds more than a tile of the logit matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from towerlab.config.checks import num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, direction_names, logits, row_targets


@dataclass
class ClipConfig(LossConfig):
    name: str = "clip"
    """The loss family: clip."""
    label_smoothing: float = num(0.0, ge=0, lt=1)
    """Label smoothing eps of the cross-entropy (1-eps on the positive, eps/N on every column), in [0, 1)."""


def infonce_rows(q: Tensor, k: Tensor, scale: Tensor, bias: Optional[Tensor], rows: slice, eps: float = 0.0) -> Tensor:
    """Mean over local rows q[rows] of the InfoNCE loss against all rows of k (positive: the same index)."""
    z = logits(q[rows], k, scale, bias)
    return F.cross_entropy(z, row_targets(rows, z.device), label_smoothing=eps)


def symmetric_infonce(
    x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], rows: slice, eps: float = 0.0,
    tiled: bool = False, tile_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """(x-to-y, y-to-x) InfoNCE losses, each the mean over this rank's local rows."""
    if tiled:
        from towerlab.losses.tiled import tiled_symmetric_infonce

        return tiled_symmetric_infonce(x, y, scale, bias, rows, eps, tile_size)
    return infonce_rows(x, y, scale, bias, rows, eps), infonce_rows(y, x, scale, bias, rows, eps)


@LOSSES.register("clip", config=ClipConfig)
class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE (CLIP), optional label smoothing and logit bias."""

    supports_tiled = True
    uses_bias = True

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        l_xy, l_yx = symmetric_infonce(x, y, scale, bias, rows, self.cfg.label_smoothing, self.cfg.tiled, self.cfg.tile_size)
        n_xy, n_yx = direction_names(self.cfg.modalities)
        return {"loss": 0.5 * (l_xy + l_yx), n_xy: l_xy, n_yx: l_yx}
