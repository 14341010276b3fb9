"""CWCL: continuously weighted contrastive loss (Srinivasa et al., NeurIPS 2023; reference/losses.md §6).

For the direction U (trained) -> V, with q the features of a frozen, pre-trained modality:

    L_{U->V} = -1/N sum_i (1 / sum_j w_ij) sum_j w_ij log softmax_j(t <p_i, v_j>),   w_ij = <q_i, q_j>/2 + 1/2

Instead of one positive per row, every candidate j is a partial positive, weighted by how similar pair j is to
pair i in the frozen modality (w in [0, 1], w_ii = 1). With `weight_temperature` set, the sharpened variant
w_ij = softmax_j(<q_i, q_j> / tau_w) is used instead (at large N the cosine weights make almost uniform targets).
The weights are detached and computed over the gathered batch. By default both directions use the weights; with
`symmetric: false` the second direction is plain InfoNCE (CellCLIP's choice).

The frozen features are meta `frozen_features` ([N, d], gathered) when given, else the features of modality
`weights_from` (detached), which is then the frozen tower's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from towerlab.config.checks import fail, num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, acc, direction_names, logits
from towerlab.losses.clip import infonce_rows


@dataclass
class CwclConfig(LossConfig):
    name: str = "cwcl"
    """The loss family: cwcl."""
    weights_from: str = "text"
    """The frozen modality whose intra-modal similarities weigh the targets; one of loss.modalities."""
    weight_temperature: Optional[float] = num(None, gt=0)
    """Sharpen the weights to softmax(cos / weight_temperature), > 0 (null: w = cos/2 + 1/2)."""
    symmetric: bool = True
    """Weigh both directions (false: the second direction is plain InfoNCE, as in CellCLIP)."""


def cwcl_weights(q: Tensor, weight_temperature: Optional[float]) -> Tensor:
    """Row-normalised target weights [N, N] from frozen features q (detached)."""
    q = acc(q.detach())
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = q @ q.T
    if weight_temperature is not None:
        return torch.softmax(cos / weight_temperature, dim=1)
    w = cos / 2 + 0.5
    return w / w.sum(dim=1, keepdim=True)


@LOSSES.register("cwcl", config=CwclConfig)
class CwclLoss(ContrastiveLoss):
    """Continuously weighted contrastive loss: soft targets from a frozen modality's similarities."""

    @classmethod
    def check_config(cls, cfg: CwclConfig) -> None:
        super().check_config(cfg)
        if cfg.weights_from not in cfg.modalities:
            raise fail("loss.weights_from", cfg.weights_from, f"must be one of loss.modalities={list(cfg.modalities)}")

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        frozen = meta.get("frozen_features")
        if frozen is None:
            frozen = feats[self.cfg.modalities.index(self.cfg.weights_from)]
        # Query i has the same targets in both directions: w is symmetric before its per-row normalisation.
        w = cwcl_weights(frozen, self.cfg.weight_temperature)[rows]

        def direction(q: Tensor, k: Tensor) -> Tensor:
            z = logits(q[rows], k, scale)
            return (torch.logsumexp(z, dim=1) - (w * z).sum(dim=1)).mean()

        l_xy = direction(x, y)
        l_yx = direction(y, x) if self.cfg.symmetric else infonce_rows(y, x, scale, None, rows)
        n_xy, n_yx = direction_names(self.cfg.modalities)
        return {"loss": 0.5 * (l_xy + l_yx), n_xy: l_xy, n_yx: l_yx}
