"""The multi-tower contrastive model: towers, the learnable logit scale (log space) and optional logit bias.

The scale is stored as t' = log t so that it stays positive; `clamp_logit_scale` keeps t <= max after every
optimizer step (CLIP clamps at 100). Its initial value comes from the recipe's loss.temperature_init (t = 1/tau)
and the bias's from loss.bias_init: towerlab.losses.base.LogitScaleInit, which every loss config inherits.

A tower is built from the recipe's sizes, or loaded pretrained (`model.{vision,text}.pretrained`, see
pretrained.py); a whole checkpoint (`model.pretrained`, see imported.py) is copied into the built towers;
`model.freeze` patterns then switch off the gradients of the parameters they name.
"""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch
from torch import nn

from towerlab.config.errors import ConfigError
from towerlab.config.schema import ModelConfig
from towerlab.models.towers import SignalTower, TextTower, VisionTower, normalize, tower_input


class ContrastiveModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        temperature_init: float = 0.07,
        bias_init: float | None = None,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        load_weights: bool = True,
    ):
        """`load_weights=False` builds pretrained towers from their configuration only (names and shapes, e.g. on
        the meta device to check freeze patterns without reading weights)."""
        super().__init__()
        if temperature_init <= 0:
            raise ConfigError(f"loss.temperature_init={temperature_init}: must be > 0")
        self.towers = nn.ModuleDict({"image": _vision(cfg, load_weights), "text": _text(cfg, load_weights)})
        for tower in self.towers.values():
            tower.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.signal.dim:
            self.towers["signal"] = SignalTower(cfg.signal, cfg.embed_dim)
        # shape [1], not []: DeepSpeed's parameter broadcast views every parameter as bytes, which 0-d tensors refuse
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature_init)),
                                        requires_grad=learn_temperature)
        self.logit_bias = nn.Parameter(torch.full((1,), float(bias_init))) if bias_init is not None else None
        self.max_log_scale = math.log(max_logit_scale)
        if cfg.pretrained and load_weights:  # a whole CLIP checkpoint onto these towers (models/imported.py)
            from towerlab.models.imported import load_into

            load_into(self, cfg.pretrained)
        freeze(self, cfg.freeze)

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        tower = self.towers[modality]
        return normalize(tower(tower_input(tower, x)))

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalised features for every modality present in `inputs` (keys: image, text, signal)."""
        return {m: self.encode(m, x) for m, x in inputs.items()}

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)


def _vision(cfg: ModelConfig, load_weights: bool) -> nn.Module:
    if not cfg.vision.pretrained:
        return VisionTower(cfg.vision, cfg.embed_dim)
    from towerlab.models.pretrained import vision_tower

    return vision_tower(cfg.vision.pretrained, cfg.embed_dim, cfg.vision.image_size, load_weights)


def _text(cfg: ModelConfig, load_weights: bool) -> nn.Module:
    if not cfg.text.pretrained:
        return TextTower(cfg.text, cfg.embed_dim)
    from towerlab.models.pretrained import text_tower

    return text_tower(cfg.text.pretrained, cfg.embed_dim, load_weights)


def freeze(model: nn.Module, patterns: list[str]) -> None:
    """Turn off the gradients of every parameter whose name matches one of `patterns` (fnmatch). A pattern that
    matches nothing is an error: it is a typo, or the model is not the one meant."""
    params = dict(model.named_parameters())
    for pat in patterns:
        matched = [p for n, p in params.items() if fnmatch(n, pat)]
        if not matched:
            towers = sorted({".".join(n.split(".")[:2]) for n in params if n.startswith("towers.")})
            raise ConfigError(f"model.freeze: {pat!r} matches no parameter; names start with {', '.join(towers)} "
                              "(list them with `towerlab recipes params RECIPE`)")
        for p in matched:
            p.requires_grad_(False)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, embeddings of positions/classes and the logit scale/bias are not decayed (as in OpenCLIP)."""
    ndim = len(getattr(param, "ds_shape", param.shape))  # under ZeRO-3 a parameter's local shape is its shard's
    return ndim < 2 or "logit_" in name or "embedding" in name and "token_embedding" not in name
