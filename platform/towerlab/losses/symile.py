"""Symile (Saporta et al., NeurIPS 2024; reference/losses.md §9): a contrastive loss for 3 or more modalities
built on the multilinear inner product MIP(a, b, c) = sum_d a_d b_d c_d.

For each anchor modality m, with O(N) negatives (Symile's default):

    K^m_j   = prod_{m' != m} r^{m'}_{pi_m'(j)}          (each non-anchor modality permuted independently)
    z^m_ij  = t MIP(r^m_i, K^m_j) = t <r^m_i, K^m_j>,   and z^m_ii = t MIP(r^m_i, prod_{m' != m} r^{m'}_i)
    L       = 1/M sum_m 1/N sum_i CE(z^m_i, i)

i.e. the diagonal is overwritten by the positive tuple and every other column is a shuffled tuple, so each anchor
row is one (anchor x fused key) matmul, as cheap as CLIP. Permutations are drawn on the gathered batch from a
generator seeded by (seed, step, anchor), so all ranks use the same ones. MIPs of unit vectors shrink as M grows:
t usually needs to be larger than CLIP's (sweep temperature_init).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from towerlab.config.checks import INT64_MAX, num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, acc, diag_mask, generator, logits, row_targets


@dataclass
class SymileConfig(LossConfig):
    name: str = "symile"
    """The loss family: symile."""
    modalities: list[str] = field(default_factory=lambda: ["image", "text", "audio"])
    """The feature keys, two or more, each once; each takes its turn as the anchor."""
    seed: int = num(0, ge=0, le=INT64_MAX)
    """Seed of the negative tuples' permutations (with the step and anchor), in [0, 2**63 - 1]."""


def symile_permutations(n: int, m: int, anchor: int, seed: int, step: int,
                        device: torch.device = torch.device("cpu")) -> list[Tensor]:
    """The independent permutations of the non-anchor modalities (in modality order) for one anchor, drawn on
    `device` (the features')."""
    g = generator((seed * 1_000_003 + step) * 64 + anchor, device)
    return [torch.randperm(n, generator=g, device=device) for _ in range(m - 1)]


@LOSSES.register("symile", config=SymileConfig)
class SymileLoss(ContrastiveLoss):
    """Symile: multilinear-inner-product contrastive loss over 3+ modalities, O(N) negatives."""

    min_modalities = 2
    max_modalities = None

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        fs = [acc(f) for f in feats]
        n, m = fs[0].shape[0], len(fs)
        step = int(meta.get("step") or 0)
        out: dict[str, Tensor] = {}
        for a in range(m):
            others = [f for i, f in enumerate(fs) if i != a]
            perms = symile_permutations(n, m, a, self.cfg.seed, step, fs[0].device)
            key = torch.stack([f[p] for f, p in zip(others, perms)]).prod(dim=0)  # [N, d] fused shuffled tuples
            positive = torch.stack([f[rows] for f in others]).prod(dim=0)  # [b, d] the true tuples
            z = logits(fs[a][rows], key, scale)
            z_pos = acc(scale) * (fs[a][rows] * positive).sum(dim=1)
            z = torch.where(diag_mask(rows, n, z.device), z_pos[:, None], z)
            out[f"loss_{self.cfg.modalities[a]}"] = F.cross_entropy(z, row_targets(rows, z.device))
        return {"loss": torch.stack(list(out.values())).mean(), **out}
