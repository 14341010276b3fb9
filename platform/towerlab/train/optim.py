"""Optimizer and schedule: AdamW with two parameter groups (no decay on norms, biases, position/class embeddings,
the logit scale and bias) and linear warm-up followed by cosine decay, stepped once per optimizer step.

`optim.implementation` picks torch's AdamW kernel: auto (torch's own choice: foreach on CUDA, the per-parameter
loop on CPU), foreach (one kernel per operation over all parameters), fused (one kernel for the whole update) or
forloop. A kernel torch does not have for the run's device is refused before anything starts (`validate_optim`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from towerlab.config.errors import ConfigError
from towerlab.config.schema import OptimConfig
from towerlab.models import no_weight_decay


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


IMPLEMENTATIONS = ("auto", "foreach", "fused", "forloop")


def supported_devices(implementation: str) -> list[str]:
    """The device types torch has the kernel for (torch's own lists, as its optimizers check them)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    if implementation == "fused":
        return _get_fused_kernels_supported_devices()
    if implementation == "foreach":
        return _get_foreach_kernels_supported_devices()
    return ["any"]


def validate_optim(cfg: OptimConfig, device: str, offloaded: bool) -> None:
    """optim.implementation: a known name, a kernel torch has on `device` ("cuda" or "cpu"), and not set where
    DeepSpeed's own CPU Adam steps an offloaded optimizer."""
    impl = cfg.implementation
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"optim.implementation={impl!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if impl in ("auto", "forloop"):
        return
    if offloaded:
        raise ConfigError(f"optim.implementation={impl}: an offloaded optimizer is DeepSpeed's CPU Adam, not torch's "
                          "AdamW; use optim.implementation=auto")
    have = supported_devices(impl)
    if device not in have:
        raise ConfigError(f"optim.implementation={impl}: torch {torch.__version__} has no {impl} AdamW on {device} "
                          f"(only on {', '.join(have)}); use auto or forloop")


def implementation_flags(implementation: str) -> dict:
    """torch.optim.AdamW's keyword arguments for `implementation`."""
    return {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
            "forloop": {"foreach": False, "fused": False}}[implementation]


def build_optimizer(module: nn.Module, cfg: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            **implementation_flags(cfg.implementation))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    return opt, sched
