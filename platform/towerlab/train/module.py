"""The module DeepSpeed wraps: the contrastive model plus the loss (which may own parameters, e.g. per-head
temperatures). Its forward runs one contrastive step on a micro-batch: embed, all-gather with gradient, loss.

Everything that touches parameters happens inside forward, so ZeRO-3's hooks have gathered them.
`build_module` builds it from a recipe (inside deepspeed.zero.Init under ZeRO-3).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from towerlab import losses
from towerlab.config import Recipe
from towerlab.losses.gather import all_gather_with_grad, gather_no_grad
from towerlab.models import ContrastiveModel
from towerlab.train.engine import construction


class ContrastiveTrainModule(nn.Module):
    def __init__(self, model: ContrastiveModel, loss_fn: nn.Module, rank: int, world_size: int):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.rank, self.world_size = rank, world_size

    def loss(self, local: dict[str, torch.Tensor], labels: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
        """The loss of this rank's rows: `local` features are gathered with gradient; labels without."""
        gathered = {m: all_gather_with_grad(f) for m, f in local.items()}
        # labels follow the features to their device: NCCL gathers device tensors only
        device = next(iter(local.values())).device
        meta = {"step": step} if labels is None else {"step": step, "labels": gather_no_grad(labels.to(device))}
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


def build_module(recipe: Recipe, rank: int, world_size: int, ds_config: dict | None = None,
                 load_weights: bool = True) -> ContrastiveTrainModule:
    """The model and loss; given the DeepSpeed config under ZeRO-3, built inside deepspeed.zero.Init so every
    parameter is partitioned as its module is constructed (no worker holds the whole model). `load_weights=False`:
    pretrained towers get their architecture only (for counting parameters on the meta device)."""
    torch.manual_seed(recipe.seed)  # identical initial weights on every rank
    lc = recipe.loss
    with construction(recipe, ds_config):
        model = ContrastiveModel(recipe.model, temperature_init=lc.temperature_init, bias_init=lc.bias_init,
                                 learn_temperature=lc.learn_temperature, max_logit_scale=lc.max_logit_scale,
                                 load_weights=load_weights)
        loss_fn = losses.build(**asdict(lc))
        module = ContrastiveTrainModule(model, loss_fn, rank, world_size)
    if recipe.train.compile:
        compile_towers(model)
    return module


def compile_towers(model: ContrastiveModel) -> None:
    """torch.compile every tower in place (nn.Module.compile keeps the parameter names, so checkpoints, freeze
    patterns and ZeRO partitions see the same module tree). Compilation happens at the first forward of each input
    shape; patch dropout keeps the shape fixed, so training compiles once and evaluation once more."""
    for tower in model.towers.values():
        tower.compile()
