"""Multi-head contrastive loss: several projection heads, each a CLIP loss with its own learnable temperature
(the per-head scalar adaptation of AMCL, Wang et al., ECCV 2024; reference/losses.md §7).

    L = 1/H sum_h L_CLIP(x^h, y^h; t_h),   t_h = min(s * exp(delta_h), max_logit_scale)

Feature convention: each modality's features are either [N, H, d] (H heads, each L2-normalised by the model), or
[N, D] with D divisible by `num_heads`, which is split into H chunks of D/H that are L2-normalised here (so the
stock single-projection model works unchanged: its embedding is cut into H subspaces). Keys stay the modality
names, and the all-gather along dim 0 is unchanged.

Temperatures: the loss module owns `log_scale_offset` (H learnable offsets delta_h, initialised to 0) and combines
them with the model's logit scale s, so all heads start at the recipe's temperature_init, the model's scale stays
meaningful (and logged), and each head drifts to its own temperature. The trainer must put this module's
parameters in the optimizer (without weight decay). AMCL's pair-adaptive temperature (an MLP over N^2 pairs) is
not used: it breaks the matmul structure; a per-head scalar keeps each head a tileable CLIP loss, and with
`tiled: true` every head runs the tiled kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from towerlab.config.checks import num
from towerlab.losses import LOSSES
from towerlab.losses.base import ContrastiveLoss, LossConfig, acc
from towerlab.losses.clip import symmetric_infonce


@dataclass
class MultiheadConfig(LossConfig):
    name: str = "multihead"
    """The loss family: multihead."""
    num_heads: int = num(4, ge=1)
    """Projection heads, each a CLIP loss with its own temperature, at least 1 (with the stock model, a divisor of
    model.embed_dim)."""
    label_smoothing: float = num(0.0, ge=0, lt=1)
    """Label smoothing of every head's cross-entropy, in [0, 1)."""


def split_heads(f: Tensor, heads: int) -> Tensor:
    """[N, H, d] as given, or [N, D] cut into H normalised chunks of D/H."""
    if f.ndim == 3:
        if f.shape[1] != heads:
            raise ValueError(f"multihead features have {f.shape[1]} heads, loss.num_heads={heads}")
        return f
    if f.shape[1] % heads:
        raise ValueError(f"multihead: feature dim {f.shape[1]} is not divisible by loss.num_heads={heads}")
    return F.normalize(acc(f).reshape(f.shape[0], heads, -1), dim=-1)  # in fp32: bf16 features lose the heads' norms


@LOSSES.register("multihead", config=MultiheadConfig)
class MultiheadLoss(ContrastiveLoss):
    """Several heads, each a CLIP loss with its own learnable temperature."""

    supports_tiled = True

    def __init__(self, cfg: MultiheadConfig):
        super().__init__(cfg)
        self.log_scale_offset = nn.Parameter(torch.zeros(cfg.num_heads), requires_grad=cfg.learn_temperature)

    def head_scales(self, scale: Tensor) -> Tensor:
        log_t = torch.log(acc(scale)) + self.log_scale_offset.to(acc(scale).dtype)
        return torch.exp(log_t.clamp(max=math.log(self.cfg.max_logit_scale)))

    def compute(self, feats, scale, bias, rows, meta: dict[str, Any]):
        cfg = self.cfg
        x, y = (split_heads(f, cfg.num_heads) for f in feats)
        scales = self.head_scales(scale)
        out: dict[str, Tensor] = {}
        losses = []
        for h in range(cfg.num_heads):
            a, b = symmetric_infonce(x[:, h], y[:, h], scales[h], None, rows, cfg.label_smoothing, cfg.tiled, cfg.tile_size)
            losses.append(0.5 * (a + b))
            out[f"loss_head{h}"] = losses[-1]
            out[f"scale_head{h}"] = scales[h].detach()
        return {"loss": torch.stack(losses).mean(), **out}
