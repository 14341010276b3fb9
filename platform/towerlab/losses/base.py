"""What every loss family shares: the common config fields, the call convention, and the small pieces of math
(local-row slicing, fp32 logits, positive masks, masked log-sum-exp) that several families need.

Call convention (the training step calls every loss this way):

    out = loss_fn(features, logit_scale=s, logit_bias=b, rank=r, world_size=W, **meta)

`features` maps modality names to L2-normalised [N, d] tensors that are already all-gathered with gradient
(N = W * b; rank r owns rows r*b:(r+1)*b). A rank computes only its local rows (and, for symmetric losses, its local
columns) against all N and returns the mean over its local rows, so that the mean over ranks of the per-rank losses
is the full-batch loss; with the autograd all-gather summing feature gradients back to their owners and the trainer
averaging parameter gradients over ranks, the gradients are then exact. The result is a dict of scalar tensors:
"loss" (what to minimise) and every named term. Logits and log-sum-exps are computed in fp32 (fp64 inputs stay fp64).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from towerlab.config.checks import check_ranges, fail, num
from towerlab.config.errors import ConfigError


@dataclass
class LogitScaleInit:
    """The initial values of the model's learnable logit scale and bias (towerlab.models.ContrastiveModel: scale =
    1/temperature_init, bias = bias_init). The model consumes them, but a good start depends on the loss, so they
    live in the recipe's `loss:` section (keys loss.temperature_init, loss.bias_init): every loss config inherits
    them from here, and a family gives its own defaults as class keywords, which keep the fields' ranges:

        @dataclass
        class SdmConfig(LossConfig, temperature_init=0.02): ...
    """

    temperature_init: float = num(0.07, gt=0)
    """Initial temperature tau: the model's logit scale starts at 1/tau; in [1/loss.max_logit_scale, 1]."""
    bias_init: Optional[float] = num(None)
    """Initial logit bias b added to every logit, any finite number (null: the model has no logit bias; only families
    that use one accept it)."""

    def __init_subclass__(cls, **defaults: Any):
        # runs before @dataclass processes the subclass: declaring the field again there, with the same metadata,
        # is how a dataclass subclass changes a default
        super().__init_subclass__()
        own = dict(cls.__dict__.get("__annotations__", {}))
        hints = typing.get_type_hints(LogitScaleInit)
        for key, value in defaults.items():
            if key not in hints:
                raise TypeError(f"{cls.__name__}: class keyword {key}= is not a logit-scale default ({', '.join(hints)})")
            own[key] = hints[key]
            setattr(cls, key, field(default=value, metadata=LogitScaleInit.__dataclass_fields__[key].metadata))
        cls.__annotations__ = own


@dataclass
class _Family:
    """The `name` key every loss config starts with."""

    name: str = "clip"
    """The loss family: a name registered in towerlab.losses.LOSSES (an unknown name is refused with the list)."""


@dataclass
class LossConfig(LogitScaleInit, _Family):
    """Fields every family has (name first, then the logit-scale initial values, then these)."""

    learn_temperature: bool = True
    """Learn the logit scale with the model (false: it stays at 1/temperature_init)."""
    max_logit_scale: float = num(100.0, ge=1)
    """Upper bound the trainer clamps the logit scale to after every step (CLIP: 100), at least 1."""
    tiled: bool = False
    """Use the memory-efficient tiled kernels of towerlab.losses.tiled, which never hold the whole logit matrix
    (families with supports_tiled only)."""
    tile_size: int = num(1024, ge=1)
    """Rows and columns of one logit tile of the tiled kernels, at least 1."""
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    """The feature keys (towers) the loss reads, query/anchor modality first, each once (two, or more for symile and
    gram)."""


class ContrastiveLoss(nn.Module):
    """Base class: holds the config, checks the call, slices the local rows; subclasses implement `compute`."""

    # What the rest of the platform may ask of a family (`towerlab.losses.loss_class(name).ATTRIBUTE`), so no
    # caller keeps its own list of family names.
    supports_tiled: bool = False  # has a memory-efficient kernel of towerlab.losses.tiled (loss.tiled=true)
    uses_bias: bool = False  # a logit bias that cancels in the loss would be a parameter without gradient
    needs_labels: bool = False  # takes positives from meta `labels` / `pos_mask` (same class or id)
    multi_positive: bool = False  # trains several captions of one image as its positives (data.captions_per_image > 1)
    one_logit_matrix: bool = False  # one logit matrix serves both directions (sigmoid); softmax ones need one each
    min_modalities: int = 2
    max_modalities: Optional[int] = 2

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: LossConfig) -> None:
        """The family's parameter rules, before anything is built: the ranges declared on the config's fields,
        then the rules between fields. A ConfigError `loss.KEY=value: ...`; families add theirs after super()'s."""
        check_ranges(cfg, "loss")
        lo = 1.0 / cfg.max_logit_scale
        if not lo <= cfg.temperature_init <= 1.0:
            # the logit scale 1/tau is clamped to [1, max_logit_scale] after every step (as CLIP does)
            raise fail("loss.temperature_init", cfg.temperature_init, f"the logit scale 1/tau is kept in "
                       f"[1, loss.max_logit_scale={cfg.max_logit_scale:g}], so use a tau in [{lo:g}, 1]")
        if cfg.tiled and not cls.supports_tiled:
            raise ConfigError(f"loss.tiled=true: loss '{cfg.name}' has no tiled kernel; set loss.tiled=false")
        if cfg.bias_init is not None and not cls.uses_bias:
            raise fail("loss.bias_init", cfg.bias_init,
                       f"loss '{cfg.name}' does not use a logit bias (it cancels); set loss.bias_init=null")
        n, lo_m, hi_m = len(cfg.modalities), cls.min_modalities, cls.max_modalities
        if n < lo_m or (hi_m is not None and n > hi_m):
            want = f"{lo_m}" if hi_m == lo_m else f"at least {lo_m}" if hi_m is None else f"{lo_m} to {hi_m}"
            raise fail("loss.modalities", list(cfg.modalities), f"loss '{cfg.name}' needs {want} modalities")
        if len(set(cfg.modalities)) != n:
            raise fail("loss.modalities", list(cfg.modalities), "repeats a modality; name each once")

    def forward(
        self,
        features: dict[str, Tensor],
        logit_scale: Tensor,
        logit_bias: Optional[Tensor] = None,
        rank: int = 0,
        world_size: int = 1,
        **meta: Any,
    ) -> dict[str, Tensor]:
        missing = [m for m in self.cfg.modalities if m not in features]
        if missing:
            raise KeyError(f"loss '{self.cfg.name}' needs features {missing}; got {sorted(features)}")
        feats = [features[m] for m in self.cfg.modalities]
        n = feats[0].shape[0]
        if any(f.shape[0] != n for f in feats):
            raise ValueError(f"loss '{self.cfg.name}': batch sizes differ across modalities {[f.shape[0] for f in feats]}")
        if self.needs_labels and meta.get("pos_mask") is None:
            check_labelled(self.cfg.name, meta.get("labels"))
        return self.compute(feats, logit_scale, logit_bias, local_rows(n, rank, world_size), meta)

    def compute(
        self, feats: list[Tensor], scale: Tensor, bias: Optional[Tensor], rows: slice, meta: dict[str, Any]
    ) -> dict[str, Tensor]:
        raise NotImplementedError


def check_labelled(name: str, labels: Optional[Tensor]) -> None:
    """A family that takes positives from labels, given a batch in which no row has one (-1 marks an unlabelled row:
    web data, captions without a label column), would treat every pair as positive: zero loss and zero gradient
    for most families. One clear error instead; the driver refuses such data before launch (train/dataset.py
    check_positives), so this is the guard of the last resort. Without `labels` at all the positives are the
    diagonal, which is what a direct call without labels asks for."""
    if labels is None or labels.is_meta:  # a meta tensor has no values to look at
        return
    if labels.numel() and not bool((labels >= 0).any()):
        raise ValueError(f"loss '{name}' takes its positives from labels, but every label in this batch is -1 "
                         "(unlabelled data): train on labelled data, several captions per image "
                         "(data.captions_per_image > 1), or loss.name=clip")


def local_rows(n: int, rank: int, world_size: int) -> slice:
    """The rows rank `rank` owns in a gathered batch of n (equal shards, rank-major order)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if n % world_size:
        raise ValueError(f"gathered batch {n} is not divisible by world size {world_size}")
    b = n // world_size
    return slice(rank * b, (rank + 1) * b)


def acc(t: Tensor) -> Tensor:
    """`t` in the accumulation dtype: fp32 for fp32/bf16/fp16 inputs (bf16 cannot resolve logits near 100),
    fp64 kept as fp64 (finite-difference tests)."""
    return t if t.dtype == torch.float64 else t.float()


def host_float(t: Tensor) -> float:
    """float(t), for the few values the host must hold (the tiled kernels' GEMM scale and their no-shift test). A
    meta tensor has no value: the device tests run the kernels on meta tensors, where 1.0 stands in."""
    return 1.0 if t.is_meta else float(t)


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on `device`, so random draws are made where the tensors live (a CUDA draw needs a CUDA
    generator). Meta tensors have no random state; a CPU generator stands in, which meta draws accept."""
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)


def logits(q: Tensor, k: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """scale * q k^T (+ bias), in fp32 (or fp64)."""
    out = acc(scale) * (acc(q) @ acc(k).T)
    return out if bias is None else out + acc(bias)


def diag_mask(rows: slice, n: int, device: Optional[torch.device] = None) -> Tensor:
    """[len(rows), n] bool, True at each local row's own column (its positive): (k, rows.start + k)."""
    k = torch.arange(rows.stop - rows.start, device=device)
    m = torch.zeros(len(k), n, dtype=torch.bool, device=device)
    m[k, k + rows.start] = True
    return m


def row_targets(rows: slice, device: Optional[torch.device] = None) -> Tensor:
    """The column index of each local row's positive (for cross_entropy)."""
    return torch.arange(rows.start, rows.stop, device=device)


def both_directions(fn, x: Tensor, y: Tensor, rows: slice, pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(fn(x, y, rows, pos[rows]), fn(y, x, rows, pos^T[rows])): a loss term computed for this rank's rows of x
    against all of y, and for its rows of y against all of x. With a positive mask, the y-to-x direction uses the
    transposed mask, whose local rows are the local columns of `pos`."""
    if pos is None:
        return fn(x, y, rows, None), fn(y, x, rows, None)
    return fn(x, y, rows, pos[rows]), fn(y, x, rows, pos[:, rows].T)


def direction_names(mods: list[str]) -> tuple[str, str]:
    """Term names of the two directions, e.g. ("loss_i2t", "loss_t2i") for image and text."""
    a, b = mods[0][0], mods[1][0]
    return f"loss_{a}2{b}", f"loss_{b}2{a}"


def positive_mask(n: int, meta: dict[str, Any], device: Optional[torch.device] = None) -> Tensor:
    """[n, n] bool, True where (i, j) is a positive pair: from meta `pos_mask`, else `labels` (same class or
    identity), else the diagonal alone. The diagonal is always positive. A negative label marks an unlabelled row
    (data.formats: -1): its only positive is the diagonal, never the other unlabelled rows."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if meta.get("pos_mask") is not None:
        m = meta["pos_mask"].to(device=device, dtype=torch.bool)
        if m.shape != (n, n):
            raise ValueError(f"pos_mask has shape {tuple(m.shape)}, expected ({n}, {n}) (the gathered batch)")
        return m | eye
    if meta.get("labels") is not None:
        lab = meta["labels"].to(device)
        if lab.shape != (n,):
            raise ValueError(f"labels has shape {tuple(lab.shape)}, expected ({n},) (the gathered batch)")
        return ((lab[:, None] == lab[None, :]) & (lab >= 0)[:, None]) | eye
    return eye


def masked_lse(x: Tensor, keep: Tensor) -> Tensor:
    """Row log-sum-exp (last dim) over the entries where `keep` is True, masked with -inf (never 0 or -100); -inf
    for a row where nothing is kept, with a zero (not NaN) gradient there."""
    has = keep.any(dim=-1, keepdim=True)
    z = x.masked_fill(~keep, float("-inf")).masked_fill(~has, 0.0)
    return torch.logsumexp(z, dim=-1).masked_fill(~has[..., 0], float("-inf"))
