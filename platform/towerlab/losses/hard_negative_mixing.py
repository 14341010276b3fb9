"""Hard-negative mixing (MoCHi, Kalantidis et al., NeurIPS 2020) adapted to cross-modal in-batch negatives
(reference/losses.md §8).

For query x_i (local row) against keys y (all N), symmetric InfoNCE plus synthetic negatives in the denominator:

    Q_i   = the `num_hard` keys most similar to x_i that are not positives (the diagonal, and every key sharing
            x_i's label or marked in pos_mask: false negatives are never mixed)
    h     = normalize(a y_n + (1 - a) y_m),  n, m ~ U(Q_i), a ~ U(0, 1)          (`num_mix` of them)
    h'    = normalize(b y_i + (1 - b) y_n),  n ~ U(Q_i),    b ~ U(0, 1/2)        (`num_query_mix` of them)
    L_i   = log( sum_j e^{t x_i.y_j} + sum_h e^{t x_i.h} ) - t x_i.y_i

and the same with the roles of x and y swapped; the two directions are averaged. The synthetic points are detached
(gradient flows to the query only) and renormalised. MoCHi's h' mixes the query itself into a negative; across
modalities that point would sit off the key manifold (the modality gap), so h' mixes the query's own positive KEY
y_i (same modality as the keys) with a hard key; b < 1/2 keeps it negative-dominated.

Warm-up: mixing starts at meta `step` >= warmup_steps; before, the loss is exactly CLIP's InfoNCE (a call without
`step` mixes). Randomness is drawn (in fp32) for all N gathered rows from a generator seeded by (seed, step, direction),
so every rank draws the same numbers and the per-rank split equals the single-process computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from towerlab.config.checks import INT64_MAX, fail, num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, acc, both_directions, direction_names, generator, logits
from towerlab.losses.base import positive_mask, row_targets


@dataclass
class HardNegativeMixingConfig(LossConfig):
    name: str = "hard_negative_mixing"
    """The loss family: hard_negative_mixing."""
    num_hard: int = num(32, ge=1)
    """Size of each query's pool of hardest true negatives (MoCHi's N), at least 1."""
    num_mix: int = num(16, ge=0)
    """Synthetic negatives per query mixed from two hard keys (MoCHi's s), at least 0."""
    num_query_mix: int = num(16, ge=0)
    """Synthetic negatives per query mixed from its positive key and a hard key (MoCHi's s'), at least 0."""
    warmup_steps: int = num(1000, ge=0)
    """Optimizer steps of plain InfoNCE before mixing starts, at least 0."""
    seed: int = num(0, ge=0, le=INT64_MAX)
    """Seed of the mixing draws (with the step and direction), in [0, 2**63 - 1]."""


def _generator(seed: int, step: int, direction: int, device: torch.device) -> torch.Generator:
    return generator((seed * 1_000_003 + step) * 2 + direction, device)


def synthetic_negatives(
    q: Tensor, k: Tensor, pos: Tensor, rows: slice, cfg: HardNegativeMixingConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Detached synthetic keys [b, s + s', d] for the local query rows q (against all keys k), and a [b, s + s']
    mask of the valid ones (a row without any true negative has none). `pos` is the local rows' [b, N] positive
    mask. Random numbers are drawn for all N rows and sliced, so they do not depend on the rank split."""
    with torch.no_grad():
        qa, ka = acc(q), acc(k)
        n = ka.shape[0]
        sim = (qa @ ka.T).masked_fill(pos, float("-inf"))
        kh = min(cfg.num_hard, n)
        vals, idx = sim.topk(kh, dim=1)
        n_valid = torch.isfinite(vals).sum(dim=1)  # the pool is sorted: its valid entries come first

        def draw(*shape: int) -> Tensor:
            # drawn in fp32 on the features' device whatever the accumulation dtype: an fp64 run mixes the same points
            # as an fp32 one
            return torch.rand(n, *shape, generator=gen, dtype=torch.float32, device=qa.device)[rows].to(qa.dtype)

        def pick(count: int) -> Tensor:  # `count` uniform draws from each row's valid pool -> key indices
            j = (draw(count) * n_valid[:, None]).long().clamp(max=kh - 1)
            return idx.gather(1, j)

        a = draw(cfg.num_mix, 1)
        mix = a * ka[pick(cfg.num_mix)] + (1 - a) * ka[pick(cfg.num_mix)]
        b = 0.5 * draw(cfg.num_query_mix, 1)
        qmix = b * ka[rows][:, None, :] + (1 - b) * ka[pick(cfg.num_query_mix)]
        h = F.normalize(torch.cat([mix, qmix], dim=1), dim=-1)
        return h, (n_valid > 0)[:, None].expand(-1, h.shape[1])


@LOSSES.register("hard_negative_mixing", config=HardNegativeMixingConfig)
class HardNegativeMixingLoss(ContrastiveLoss):
    """Symmetric InfoNCE with MoCHi-style synthetic hard negatives (cross-modal, in-batch), after a warm-up."""

    needs_labels = True  # labels keep false negatives out of the hard-negative pool

    @classmethod
    def check_config(cls, cfg: HardNegativeMixingConfig) -> None:
        super().check_config(cfg)
        if cfg.num_mix + cfg.num_query_mix < 1:
            raise fail("loss.num_mix", cfg.num_mix, f"with loss.num_query_mix={cfg.num_query_mix} there is nothing to "
                       "mix; make loss.num_mix + loss.num_query_mix at least 1")

    def mixing(self, step: Optional[int]) -> bool:
        return step is None or step >= self.cfg.warmup_steps

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        x, y = feats
        step = meta.get("step")
        mixing = self.mixing(step)
        pos = positive_mask(x.shape[0], meta, x.device)
        direction_id = iter(range(2))

        def direction(q: Tensor, k: Tensor, rows: slice, p_rows: Tensor) -> Tensor:
            z = logits(q[rows], k, scale)
            gen = _generator(self.cfg.seed, step or 0, next(direction_id), q.device)
            if mixing:
                h, valid = synthetic_negatives(q[rows], k, p_rows, rows, self.cfg, gen)
                zs = acc(scale) * torch.einsum("bd,bsd->bs", acc(q[rows]), h)
                z = torch.cat([z, zs.masked_fill(~valid, float("-inf"))], dim=1)
            return F.cross_entropy(z, row_targets(rows, z.device))

        l_xy, l_yx = both_directions(direction, x, y, rows, pos)
        n_xy, n_yx = direction_names(self.cfg.modalities)
        return {"loss": 0.5 * (l_xy + l_yx), n_xy: l_xy, n_yx: l_yx,
                "mixing": torch.tensor(float(mixing), device=x.device)}
