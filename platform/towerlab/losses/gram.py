"""GRAM: contrastive learning with the Gram volume of 3+ modalities (Cicchetti et al., ICLR 2025;
reference/losses.md §9), numerically stabilised.

For an anchor a_i (first modality, text in GRAM) and a candidate tuple j of the other k modalities
(m_1j, ..., m_kj), kept together, the volume of the parallelotope they span is V_ij = sqrt(det G_ij), G_ij the
(k+1) x (k+1) Gram matrix of [a_i, m_1j, ..., m_kj]; V in [0, 1] for unit vectors, 0 when aligned.

    L = 1/2 [ CE(-t V, diag) + CE(-t V^T, diag) ],   label smoothing 0.1 (GRAM's)

Stabilisation.
- det G_ij is never formed by an LU of N^2 small matrices. With C the Gram of the candidate's own vectors (k x k,
  per candidate) and c_l = <a_i, m_lj> (k matmuls of anchors x candidates), the Schur expansion
  det G = |a_i|^2 det C - c^T adj(C) c holds for any C (adj(C) = det(C) C^-1 where C is invertible, and the
  cofactor matrix always), so it is a polynomial in dot products: smooth, exact, and O(N^2 k^2) elementwise work.
  det C and the cofactors are computed per candidate in fp64.
- sqrt has an infinite slope at 0, exactly where positives converge: V = sqrt(max(det, 0) + volume_eps), so
  the gradient is bounded by 1/(2 sqrt(volume_eps)); with `squared_volume: true`, V^2 = det is used instead.
- t is the model's exp-parametrised, clamped logit scale (GRAM's raw, unclamped tau is not used).
The reference gathered without gradient; here every modality is gathered with gradient like every other loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from towerlab.config.checks import num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, acc, row_targets


@dataclass
class GramConfig(LossConfig):
    name: str = "gram"
    """The loss family: gram."""
    modalities: list[str] = field(default_factory=lambda: ["text", "image", "audio"])
    """The feature keys, anchor first, then the modalities of each candidate tuple (two or more, each once)."""
    label_smoothing: float = num(0.1, ge=0, lt=1)
    """Label smoothing of the cross-entropy over volumes (GRAM's 0.1), in [0, 1)."""
    volume_eps: float = num(1e-6, ge=0)
    """Added under the square root of the volume, bounding its gradient by 1/(2 sqrt(volume_eps)); at least 0."""
    squared_volume: bool = False
    """Use the squared volume det G (no square root) as the distance."""


def _det(m: Tensor) -> Tensor:
    """Batched determinant of small matrices [..., k, k]; closed forms up to 2 x 2 (smooth, no LU)."""
    k = m.shape[-1]
    if k == 0:
        return torch.ones(m.shape[:-2], dtype=m.dtype, device=m.device)
    if k == 1:
        return m[..., 0, 0]
    if k == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    return torch.linalg.det(m)


def _adjugate(c: Tensor) -> Tensor:
    """Batched adjugate (transposed cofactor matrix) of [..., k, k]."""
    k = c.shape[-1]
    adj = torch.empty_like(c)
    idx = list(range(k))
    for r in idx:
        for s in idx:
            keep_r, keep_s = [i for i in idx if i != r], [i for i in idx if i != s]
            minor = c[..., keep_r, :][..., :, keep_s]
            adj[..., s, r] = (-1) ** (r + s) * _det(minor)
    return adj


def gram_volume_sq(anchors: Tensor, tuples: list[Tensor]) -> Tensor:
    """det G_ij for every anchor i [B, d] and candidate tuple j (k tensors [C, d]): [B, C]."""
    a = acc(anchors)
    ms = [acc(m) for m in tuples]
    c64 = torch.stack([torch.stack([(p * q).sum(-1) for q in ms], -1) for p in ms], -2).double()  # [C, k, k]
    det_c, adj = _det(c64).to(a.dtype), _adjugate(c64).to(a.dtype)
    cross = [a @ m.T for m in ms]  # c_l as [B, C]
    quad = sum(adj[None, :, l, r] * cross[l] * cross[r] for l in range(len(ms)) for r in range(len(ms)))
    return (a * a).sum(-1)[:, None] * det_c[None, :] - quad


@LOSSES.register("gram", config=GramConfig)
class GramLoss(ContrastiveLoss):
    """GRAM: Gram-volume contrastive loss over 3+ modalities (anchor vs candidate tuples), stabilised."""

    min_modalities = 2
    max_modalities = None

    def volume(self, det: Tensor) -> Tensor:
        return det if self.cfg.squared_volume else torch.sqrt(det.clamp_min(0) + self.cfg.volume_eps)

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        anchor, others = feats[0], feats[1:]
        t, eps = acc(scale), self.cfg.label_smoothing
        # Local anchors against all tuples, and all anchors against the local tuples (the transposed direction).
        v_at = self.volume(gram_volume_sq(anchor[rows], list(others)))
        v_ta = self.volume(gram_volume_sq(anchor, [m[rows] for m in others])).T
        target = row_targets(rows, v_at.device)
        l_at = F.cross_entropy(-t * v_at, target, label_smoothing=eps)
        l_ta = F.cross_entropy(-t * v_ta, target, label_smoothing=eps)
        return {"loss": 0.5 * (l_at + l_ta), "loss_anchor2tuple": l_at, "loss_tuple2anchor": l_ta}
