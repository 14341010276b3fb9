"""Loading a recipe with every variant resolved: `loss.name` through the loss registry, `model.arch` through the
architecture files; then the checks that need more than one section (batch plan, sizes that must agree).

This lives in train/ rather than config/ because it wires the registries of losses and models, which config/ may
not import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from towerlab import losses
from towerlab.config import DEFAULT_EVALS, ConfigError, Recipe, Variant, load_structured, read_yaml, resolve_batch
from towerlab.data import SOURCES
from towerlab.data.checks import validate_data
from towerlab.data.location import is_uri
from towerlab.models import arch_preset, archs
from towerlab.train.deepspeed_config import offloading
from towerlab.train.memory import validate_scale
from towerlab.train.optim import validate_optim
from towerlab.train.evaluate import validate_evals
from towerlab.util import did_you_mean

VARIANTS = (
    Variant("loss", "name", registry=losses.LOSSES),
    Variant("model", "arch", preset=arch_preset, names=lambda: archs().names()),
)
DEFAULTS = {"loss": {"name": "clip"}, "model": {"arch": "debug"}}


def load_recipe(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Recipe:
    overrides = list(overrides)
    chosen = [o.partition("=")[2] for o in overrides if o.startswith("preset=")]
    if chosen:
        overrides = [*preset_overrides(path, chosen[-1]), *(o for o in overrides if not o.startswith("preset="))]
    base = dict(DEFAULTS)
    if path is None or "evals" not in read_yaml(path):
        # a default dict would merge with (not be replaced by) a recipe's own evals: add it only when there is none
        base["evals"] = DEFAULT_EVALS
    recipe: Recipe = load_structured(Recipe, path, overrides, VARIANTS, base=base)
    validate(recipe)
    return recipe


def preset_overrides(path: str | os.PathLike | None, name: str) -> list[str]:
    """The recipe file's `presets.<name>` section as dotted overrides (the user's own overrides come after it)."""

    from omegaconf import OmegaConf

    from towerlab.config import flatten, read_yaml

    presets = OmegaConf.select(read_yaml(path), "presets", default=None) if path is not None else None
    names = list(presets.keys()) if presets is not None else []
    if name not in names:
        raise ConfigError(f"preset={name}: {path} has no preset '{name}'.{did_you_mean(name, names)} Presets: {', '.join(names) or 'none'}")
    values = flatten(OmegaConf.to_container(presets[name]))
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def validate(r: Recipe) -> None:
    """Checks across sections; each failure names the keys and what to change."""
    resolve_batch(r.data.global_batch, r.train.workers, r.data.micro_batch)
    if r.data.source not in ("parquet", "webdataset") and r.data.source not in SOURCES:
        raise ConfigError(f"data.source: {SOURCES.unknown_message(r.data.source)}, parquet, webdataset")
    if r.data.source in ("parquet", "webdataset") and not r.data.path:
        raise ConfigError(f"data.source={r.data.source} needs data.path: a directory from `towerlab data prepare`")
    validate_data(r.data)
    lo = 1.0 / r.loss.max_logit_scale
    if not lo <= r.loss.temperature_init <= 1.0:
        # the logit scale 1/tau is clamped to [1, max_logit_scale] after every step (as CLIP does)
        raise ConfigError(f"loss.temperature_init={r.loss.temperature_init}: the logit scale 1/tau is kept in "
                          f"[1, loss.max_logit_scale={r.loss.max_logit_scale:g}], so use a tau in [{lo:g}, 1]")
    towers = ["image", "text"] + (["signal"] if r.model.signal.dim else [])
    missing = [m for m in r.loss.modalities if m not in towers]
    if missing:
        raise ConfigError(f"loss.modalities={list(r.loss.modalities)}: the model has no tower for {missing} (it has "
                          f"{towers}); a 'signal' tower needs model.signal.dim > 0 and data.source=synthetic3")
    v = r.model.vision
    if v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size={v.image_size} is not a multiple of model.vision.patch_size="
                          f"{v.patch_size}: change one of them")
    for tower, c in (("vision", v), ("text", r.model.text)):
        if c.width % c.heads:
            raise ConfigError(f"model.{tower}.width={c.width} is not divisible by model.{tower}.heads={c.heads}")
    if not 0.0 <= v.patch_dropout < 1.0:
        raise ConfigError(f"model.vision.patch_dropout={v.patch_dropout}: the fraction of patches dropped must be in "
                          "[0, 1) (FLIP uses 0.5 or 0.75; 0 turns it off)")
    if v.patch_dropout and v.pretrained:
        raise ConfigError("model.vision.patch_dropout applies to towerlab's own ViT, not to a pretrained vision tower "
                          "(model.vision.pretrained): set it to 0")
    validate_optim(r.optim, "cuda" if r.train.use_gpu else "cpu", offloading(r))
    if r.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={r.train.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if r.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision={r.train.precision!r}: use auto, fp32 or bf16")
    if r.train.precision == "bf16" and not r.train.use_gpu:
        raise ConfigError("train.precision=bf16 on CPU: bf16 matmuls are far slower than fp32 there; use fp32 or auto")
    if r.optim.schedule not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule={r.optim.schedule!r}: use cosine or constant")
    for key in ("steps", "log_every", "checkpoint_every"):
        if getattr(r.train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(r.train, key)}: must be at least 1")
    if r.eval.every < 1:
        raise ConfigError(f"eval.every={r.eval.every}: must be at least 1")
    validate_scale(r)
    validate_evals(r)
    validate_pretrained(r)
    if not r.name or "/" in r.name:
        raise ConfigError(f"name={r.name!r}: a run name is a non-empty string without '/'")


def validate_pretrained(r: Recipe) -> None:
    """Pretrained towers and freezing: loader names, what they exclude, and freeze patterns that match."""
    from towerlab.hub import LOADERS, parse

    m = r.model
    if m.text.pretrained:
        parse(m.text.pretrained, "model.text.pretrained", ("hf",))
        a = r.data.augment
        if a.token_mask or a.stopword_removal:
            raise ConfigError("data.augment.token_mask / stopword_removal act on the data's word vocabulary, which a "
                              "pretrained text tower does not read (it has its own tokenizer): turn them off")
    if m.vision.pretrained:
        parse(m.vision.pretrained, "model.vision.pretrained", LOADERS)
    if (m.text.pretrained or m.vision.pretrained) and r.train.zero_stage == 3:
        raise ConfigError("model.*.pretrained with train.zero_stage=3: pretrained weights are loaded whole on every "
                          "worker, which ZeRO-3's partitioned construction does not do yet; use train.zero_stage=2")
    if m.freeze:
        import torch

        from towerlab.models import ContrastiveModel

        with torch.device("meta"):  # names and shapes only: no memory, no weights read
            ContrastiveModel(m, temperature_init=r.loss.temperature_init, load_weights=False)


def data_dir(r: Recipe) -> Path | str:
    """Where the run's shards live: data.path (a directory or a URI), or data/<source> for a built-in source."""
    if r.data.path and is_uri(r.data.path):
        return r.data.path
    return Path(r.data.path or Path("data") / r.data.source).absolute()
