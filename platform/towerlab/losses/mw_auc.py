"""Mann-Whitney / AUC loss ("Optimizing What Matters": the pairwise surrogate of retrieval AUC).

    L_dir = 1/N sum_q  1/(|P_q| |N_q|)  sum_{p in P_q} sum_{n in N_q}  -log sigmoid(t (s_qp - s_qn))

over queries q (this rank's rows), their positives p and in-batch negatives n, in both directions (x queries
against y candidates, and y against x), averaged. -log sigmoid(u) = softplus(-u). Each query weighs the same
(mean over its own positive-negative pairs, then over queries), which keeps the per-rank means exact. Positives:
meta `pos_mask`, else `labels`, else the diagonal alone (then the pairs are (i, n != i) and the computation is
O(N) per query); a query without negatives contributes 0. A logit bias cancels in the differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, both_directions, diag_mask, direction_names, logits
from towerlab.losses.base import positive_mask

PAIR_CHUNK = 1 << 22  # elements of the [rows, |P|, |N|] difference tensor held at once


@dataclass
class MwAucConfig(LossConfig):
    name: str = "mw_auc"
    """The loss family: mw_auc."""


def softplus(u: Tensor) -> Tensor:
    """log(1 + e^u) exactly (torch's softplus is linear above 20, an error of up to 2e-9)."""
    return torch.logaddexp(u, torch.zeros((), dtype=u.dtype, device=u.device))


def auc_single_positive(z: Tensor, diag: Tensor) -> Tensor:
    """Per-row mean over n != i of softplus(z_in - z_ii) ([b, N] logits, [b, N] diagonal mask)."""
    # each row's one positive, read without boolean indexing (a data-dependent shape: a host sync on a GPU)
    z_pos = z.masked_fill(~diag, 0.0).sum(dim=1, keepdim=True)
    terms = softplus(z - z_pos).masked_fill(diag, 0.0)
    return terms.sum(dim=1) / max(z.shape[1] - 1, 1)


def auc_multi_positive(z: Tensor, pos: Tensor) -> Tensor:
    """Per-row mean over (p in P, n not in P) of softplus(z_n - z_p), by chunks of rows."""
    b, n = z.shape
    neg = ~pos
    out = []
    chunk = max(1, PAIR_CHUNK // max(n * n, 1))
    for r in range(0, b, chunk):
        zc, pc, nc = z[r : r + chunk], pos[r : r + chunk], neg[r : r + chunk]
        diff = softplus(zc[:, None, :] - zc[:, :, None])  # [c, p, n] = softplus(z_n - z_p)
        pairs = pc[:, :, None] & nc[:, None, :]
        total = (diff * pairs).sum(dim=(1, 2))
        out.append(total / pairs.sum(dim=(1, 2)).clamp_min(1))
    return torch.cat(out)


@LOSSES.register("mw_auc", config=MwAucConfig)
class MwAucLoss(ContrastiveLoss):
    """Mann-Whitney/AUC pairwise loss over (query, positive, negative) triplets, both directions."""

    needs_labels = True

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        multi = meta.get("pos_mask") is not None or meta.get("labels") is not None
        pos = positive_mask(x.shape[0], meta, x.device) if multi else None

        def direction(q: Tensor, k: Tensor, rows: slice, p: Tensor | None) -> Tensor:
            z = logits(q[rows], k, scale)
            per_row = auc_multi_positive(z, p) if multi else auc_single_positive(z, diag_mask(rows, k.shape[0], z.device))
            return per_row.mean()

        l_xy, l_yx = both_directions(direction, x, y, rows, pos)
        n_xy, n_yx = direction_names(self.cfg.modalities)
        return {"loss": 0.5 * (l_xy + l_yx), n_xy: l_xy, n_yx: l_yx}
