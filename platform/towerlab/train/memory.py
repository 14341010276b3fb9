"""The batch and memory estimator behind `towerlab plan` and the check `towerlab train` runs before starting Ray.

For a recipe (and a worker count and device memory) it states: the batch plan (global batch = micro-batch x
accumulation x workers), the negatives each sample sees per step, and the per-worker memory of

- model states (parameters, gradients, optimizer state) for every ZeRO stage, partitioned as ZeRO partitions them,
  with the recipe's offload settings; for bf16 on GPUs, stage 2 and 3 also use DeepSpeed's own estimators
  (estimate_zero2/zero3_model_states_mem_needs), which assume mixed precision and do not fit fp32 on CPU;
- activations of one micro-batch, with and without per-block activation checkpointing;
- the loss: the gathered features plus the logit matrix, full (this rank's rows x the global batch) or tiled.

Parameters are counted on the meta device, so planning a 1.4B model allocates nothing. The byte counts per
parameter (ZeRO paper, Rajbhandari et al. 2020, with DeepSpeed's bookkeeping): bf16 params 2, grads 2 + 4 (fp32
accumulation), optimizer 12 (fp32 master, Adam m and v); fp32 params 4, grads 4, optimizer 8 (Adam m and v) or 12
at stages 1-2 and with an offloaded optimizer (a separate fp32 partition copy; under ZeRO-3 towerlab aliases it to
the parameters). These are estimates; benchmarks/zero_memory.py measures the real peaks.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from towerlab.config import BatchPlan, ConfigError, Recipe, resolve_batch
from towerlab.losses import loss_class
from towerlab.train.deepspeed_config import precision

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, key: str = "train.device_memory") -> int:
    """'80GiB', '24 GB', '512MiB', '1e9' -> bytes; anything else is a ConfigError naming `key`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"{key}={text!r} is not a memory size: write e.g. 80GiB, 40GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 or n == 0 else f"{n / (1 << 20):.2f} MiB"


@dataclass(frozen=True)
class ModelStates:
    """Bytes per worker of one ZeRO stage: on the device, and moved off it (host RAM or NVMe) by offload."""

    stage: int
    params: float
    grads: float
    optimizer: float
    offloaded: float = 0.0
    deepspeed: float | None = None  # DeepSpeed's estimator (device bytes), where it applies

    @property
    def device(self) -> float:
        own = self.params + self.grads + self.optimizer
        return self.deepspeed if self.deepspeed is not None else own


@dataclass
class MemoryPlan:
    batch: BatchPlan
    params: int
    largest_layer: int
    precision: str
    stage: int
    checkpointing: bool
    tiled: bool
    stages: list[ModelStates]
    activations: dict[str, float]  # "full", "checkpointed"
    loss: dict[str, float]  # "full", "tiled"
    device_memory: int | None
    device_memory_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> ModelStates:
        return self.stages[self.stage]

    @property
    def per_worker(self) -> float:
        act = self.activations["checkpointed" if self.checkpointing else "full"]
        return self.chosen.device + act + self.loss["tiled" if self.tiled else "full"]

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.per_worker <= self.device_memory

    def refusal(self, name: str) -> str:
        act = "checkpointed" if self.checkpointing else "full"
        return (f"recipe '{name}' cannot fit: per worker {gib(self.per_worker)} needed (ZeRO-{self.stage} model "
                f"states {gib(self.chosen.device)} + activations ({act}) {gib(self.activations[act])} + loss "
                f"({'tiled' if self.tiled else 'full'}) {gib(self.loss['tiled' if self.tiled else 'full'])}) > "
                f"{gib(self.device_memory or 0)} ({self.device_memory_source}); raise train.zero_stage, set "
                "model.grad_checkpointing=true, loss.tiled=true, a smaller data.micro_batch or train.offload_optimizer"
                " (see `towerlab plan`)")


def count_params(recipe: Recipe) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters) of the recipe's model and loss, built on the
    meta device (no memory). The largest layer is what ZeRO-3 gathers at once (DeepSpeed's model_to_params)."""
    import torch

    from towerlab.train.module import build_module

    with torch.device("meta"):
        module = build_module(recipe, rank=0, world_size=1, load_weights=False)
    total = sum(p.numel() for p in module.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())
    return total, largest


def _bytes_per_param(prec: str, stage: int, master_aliased: bool) -> tuple[int, int, int]:
    if prec == "bf16":
        return 2, 6, 12
    # fp32: Adam's two moments, plus under ZeRO 1-2 DeepSpeed's fp32 master copy; ZeRO-3 without optimizer offload
    # has none (towerlab aliases it to the parameters: zero.share_master_weights)
    return 4, 4, 8 if stage == 0 or master_aliased else 12


def model_states(recipe: Recipe, params: int, largest: int, stage: int, world: int,
                 gpus_per_node: int = 8) -> ModelStates:
    prec = precision(recipe)
    pb, gb, ob = _bytes_per_param(prec, stage, stage == 3 and recipe.train.offload_optimizer == "none")
    p = params * pb / (world if stage >= 3 else 1)
    g = params * gb / (world if stage >= 2 else 1)
    o = params * ob / (world if stage >= 1 else 1)
    t = recipe.train
    # on CPU workers the "device" is host RAM: offloading to cpu moves nothing off it; nvme does
    off_opt = stage >= 1 and (t.offload_optimizer == "nvme" or t.offload_optimizer == "cpu" and t.use_gpu)
    off_par = stage == 3 and (t.offload_param == "nvme" or t.offload_param == "cpu" and t.use_gpu)
    offloaded = (o if off_opt else 0.0) + (p if off_par else 0.0)
    if off_opt:
        # the optimizer steps one sub-group at a time through a device buffer (fp32 params, grads, m, v)
        o = min(o, 16 * t.sub_group_size)
    if off_par:
        p = 4 * largest if prec == "fp32" else 2 * largest
    ds = None
    if prec == "bf16" and t.use_gpu and stage in (2, 3):
        ds = _deepspeed_estimate(params, largest, stage, world, gpus_per_node, t.offload_optimizer != "none",
                                 t.offload_param != "none")
    return ModelStates(stage, p, g, o, offloaded, ds)


def _deepspeed_estimate(params: int, largest: int, stage: int, world: int, gpus_per_node: int,
                        offload_opt: bool, offload_param: bool) -> float:
    """DeepSpeed's estimator of device bytes per GPU (mixed precision, Adam), stages 2 and 3."""
    import torch

    # the estimators are arithmetic; importing DeepSpeed still picks an accelerator once per process
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    per_node = min(gpus_per_node, world)
    nodes = math.ceil(world / per_node)
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, dev = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=offload_opt)
        return float(dev)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, dev, _ = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes, cpu_offload=offload_opt,
                                                      cpu_offload_params=offload_param, zero_init=True)
    return float(dev)


def activation_bytes(recipe: Recipe, micro_batch: int, checkpointed: bool) -> float:
    """Activations kept for backward by one micro-batch through both towers. Per block and sample (pre-LN block,
    MLP ratio r): about s*h*(8 + 2r) values (norm inputs/outputs, q/k/v, attention output, the MLP's hidden twice)
    plus heads*s*s attention probabilities; with checkpointing only each block's input (s*h) stays, plus one
    block's full set while it is recomputed."""
    bytes_per = 2 if precision(recipe) == "bf16" else 4
    total = 0.0
    v, t = recipe.model.vision, recipe.model.text
    for seq, c in (((v.image_size // v.patch_size) ** 2 + int(v.class_token), v), (t.context_length, t)):
        block = seq * c.width * (8 + 2 * c.mlp_ratio) + c.heads * seq * seq
        total += (c.layers * seq * c.width + block) if checkpointed else c.layers * block
    return total * micro_batch * bytes_per


def loss_bytes(recipe: Recipe, plan: BatchPlan, tiled: bool) -> float:
    """Gathered features (all modalities, with their gradients) plus the fp32 logits, their softmax and gradient:
    this rank's rows (its whole share of the global batch, through the feature cache) x the global batch, or one
    tile of it."""
    n, rows = plan.global_batch, plan.per_worker
    mods = len(recipe.loss.modalities)
    feats = 2 * n * recipe.model.embed_dim * 4 * mods
    mats = logit_matrices(recipe)
    if tiled:
        size = recipe.loss.tile_size
        return feats + mats * 3 * min(size, rows) * min(size, n) * 4
    return feats + mats * 3 * rows * n * 4


def default_device_memory(recipe: Recipe) -> tuple[int | None, str]:
    if recipe.train.device_memory:
        return parse_bytes(recipe.train.device_memory), f"train.device_memory={recipe.train.device_memory}"
    if recipe.train.use_gpu:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, "this machine's GPU 0"
        return None, "no GPU here and train.device_memory not set: not checked"
    # CPU workers of a local run share this host's RAM
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // recipe.train.workers, f"this host's RAM / {recipe.train.workers} workers"


def plan_memory(recipe: Recipe, gpus_per_node: int = 8) -> MemoryPlan:
    t = recipe.train
    batch = resolve_batch(recipe.data.global_batch, t.workers, recipe.data.micro_batch)
    params, largest = count_params(recipe)
    stages = [model_states(recipe, params, largest, s, t.workers, gpus_per_node) for s in range(4)]
    mem, source = default_device_memory(recipe)
    plan = MemoryPlan(
        batch=batch, params=params, largest_layer=largest, precision=precision(recipe), stage=t.zero_stage,
        checkpointing=recipe.model.grad_checkpointing, tiled=recipe.loss.tiled, stages=stages,
        activations={k: activation_bytes(recipe, batch.micro_batch, k == "checkpointed")
                     for k in ("full", "checkpointed")},
        loss={k: loss_bytes(recipe, batch, k == "tiled") for k in ("full", "tiled")},
        device_memory=mem, device_memory_source=source)
    if t.offload_param != "none" and t.zero_stage != 3:
        plan.notes.append("train.offload_param applies to ZeRO-3 only")
    return plan


def validate_scale(r: Recipe) -> None:
    """The scale settings of train that involve more than one key (offload devices and their stages, the memory
    size); single-key ranges and allowed values are declared on the fields (config/checks.py)."""
    t = r.train
    if t.offload_optimizer != "none" and t.zero_stage < 1:
        raise ConfigError(f"train.offload_optimizer={t.offload_optimizer} needs train.zero_stage >= 1 (ZeRO-Offload)")
    if t.offload_param != "none" and t.zero_stage != 3:
        raise ConfigError(f"train.offload_param={t.offload_param} needs train.zero_stage=3 (ZeRO-Infinity)")
    if "nvme" in (t.offload_optimizer, t.offload_param) and not t.nvme_path:
        raise ConfigError("nvme offload needs train.nvme_path: a directory on a local disk")
    if t.device_memory is not None:
        parse_bytes(t.device_memory)
    if t.export_fp32 and t.zero_stage == 0:
        raise ConfigError("train.export_fp32 consolidates ZeRO shards (zero_to_fp32): it needs train.zero_stage >= 1")


def check_fits(recipe: Recipe) -> MemoryPlan:
    """What `towerlab train` runs first: a ConfigError with the numbers when the plan cannot fit."""
    plan = plan_memory(recipe)
    if not plan.fits:
        raise ConfigError(plan.refusal(recipe.name))
    return plan


def logit_matrices(recipe: Recipe) -> int:
    """Logit matrices the loss holds per step: one for a sigmoid family (one_logit_matrix: siglip), else one per
    direction (at least two: image->text and text->image)."""
    return 1 if loss_class(recipe.loss.name).one_logit_matrix else max(2, len(recipe.loss.modalities))


def negatives(recipe: Recipe, batch: BatchPlan) -> list[tuple[str, str]]:
    """(direction, negatives per sample per step) for the recipe's loss: every other sample of the global batch
    through the feature cache; plain DeepSpeed accumulation would give only a micro-batch's worth."""
    mods = list(recipe.loss.modalities)
    pairs = [(a, b) for a in mods for b in mods if a != b]
    if loss_class(recipe.loss.name).one_logit_matrix:
        pairs = pairs[:1]
    return [(f"{a} -> {b}", f"{batch.negatives:,}") for a, b in pairs]
