"""The module DeepSpeed wraps: the contrastive model plus the loss (which may own parameters, e.g. per-head
temperatures). Its forward runs one contrastive step on a micro-batch: embed, all-gather with gradient, loss.

Everything that touches parameters happens inside forward, so ZeRO-3's hooks have gathered them.
"""

from __future__ import annotations

import torch
from torch import nn

from towerlab.losses.gather import all_gather_with_grad, gather_no_grad
from towerlab.models import ContrastiveModel


class ContrastiveTrainModule(nn.Module):
    def __init__(self, model: ContrastiveModel, loss_fn: nn.Module, rank: int, world_size: int):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.rank, self.world_size = rank, world_size

    def loss(self, local: dict[str, torch.Tensor], labels: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
        """The loss of this rank's rows: `local` features are gathered with gradient; labels without."""
        gathered = {m: all_gather_with_grad(f) for m, f in local.items()}
        meta = {"step": step} if labels is None else {"step": step, "labels": gather_no_grad(labels)}
        out = self.loss_fn(gathered, logit_scale=self.model.logit_scale.exp(), logit_bias=self.model.logit_bias,
                           rank=self.rank, world_size=self.world_size, **meta)
        out["logit_scale"] = self.model.logit_scale.detach().exp()
        return out

    def loss_parameters(self) -> list[nn.Parameter]:
        """What the loss uses directly, besides the features: logit scale and bias, the loss's own parameters."""
        own = [self.model.logit_scale, self.model.logit_bias, *self.loss_fn.parameters()]
        return [p for p in own if p is not None and p.requires_grad]

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
                step: int = 0, features_only: bool = False) -> dict[str, torch.Tensor]:
        """The loss terms of a micro-batch; with features_only, its local normalised features (the feature cache
        encodes through the engine this way: ZeRO-3 coordinates parameters only in the engine's forward)."""
        if features_only:
            return self.model(inputs)
        return self.loss(self.model(inputs), labels, step)
