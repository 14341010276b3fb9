"""Loading a recipe with every variant resolved: `loss.name` through the loss registry, `model.arch` through the
architecture files; then every check of its values (`validate`), so a bad value is a ConfigError at load, before
anything starts.

This lives in train/ rather than config/ because it wires the registries of losses and models, which config/ may
not import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from towerlab import losses
from towerlab.config import DEFAULT_EVALS, ConfigError, Recipe, Variant, load_structured, read_yaml
from towerlab.config.checks import check_recipe
from towerlab.data import SOURCES
from towerlab.data.pipeline import tokenizer_spec
from towerlab.data.location import is_uri
from towerlab.hub import anchored
from towerlab.models import arch_preset, archs
from towerlab.models.towers import ACTIVATIONS
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
    """The recipe at `path` (None: the defaults alone) with dotted `overrides` applied, typed and validated.

    Order: a `preset=NAME` override expands first into the file's `presets.NAME` values (the user's own overrides
    still win); then towerlab's defaults <- the file <- the overrides are merged by config/load.py, with `loss.name`
    and `model.arch` resolved through their registries before their sections are merged (OmegaConf holds no union
    of dataclasses); default evaluators are added only when the file has no `evals:` of its own. Then every check
    that needs more than one section (`validate`). Any problem is a ConfigError naming the key and the fix, raised
    before a process starts."""
    overrides = list(overrides)
    chosen = [o.partition("=")[2] for o in overrides if o.startswith("preset=")]
    if chosen:
        overrides = [*preset_overrides(path, chosen[-1]), *(o for o in overrides if not o.startswith("preset="))]
    base = dict(DEFAULTS)
    if (path is None or "evals" not in read_yaml(path)) and not any(o.partition("=")[0] == "evals" for o in overrides):
        # a default dict would merge with (not be replaced by) a recipe's own evals (or an `evals={}` override, which
        # trains with no evaluators): add it only when there is none
        base["evals"] = DEFAULT_EVALS
    recipe: Recipe = load_structured(Recipe, path, overrides, VARIANTS, base=base)
    m = recipe.model
    m.pretrained, m.vision.pretrained, m.text.pretrained = map(anchored, (m.pretrained, m.vision.pretrained,
                                                                          m.text.pretrained))
    for e in recipe.evals.values():  # benchmark files named relative to here, read by workers elsewhere
        e.data, e.classnames, e.templates, e.images = (
            str(Path(v).resolve()) if v and v not in ("train", "heldout") and Path(v).exists() else v
            for v in (e.data, e.classnames, e.templates, e.images))
    if recipe.model.pretrained:  # the checkpoint's own architecture, tokenizer and image statistics
        from towerlab.models.imported import configure

        configure(recipe.model)
    if any(o.replace(" ", "") == "evals={}" for o in overrides):
        recipe.evals = {}  # merging {} would keep a recipe file's evaluators: `evals={}` means none
    if recipe.train.samples:  # a compute-matched budget: the steps follow from it (both are recorded)
        recipe.train.steps = -(-recipe.train.samples // recipe.data.global_batch)
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
    """Every check of a resolved recipe, each failure one line naming the key and what to change: the schema's own
    (towerlab.config.checks: ranges, each section's rules, the batch plan), then those that need the registries
    (data sources, the loss family's parameter rules, evaluators) or more than one section."""
    check_recipe(r)
    if r.data.source not in ("parquet", "webdataset") and r.data.source not in SOURCES:
        raise ConfigError(f"data.source: {SOURCES.unknown_message(r.data.source)}, parquet, webdataset")
    towers = ["image", "text"] + (["signal"] if r.model.signal.dim else [])
    missing = [m for m in r.loss.modalities if m not in towers]
    if missing:
        raise ConfigError(f"loss.modalities={list(r.loss.modalities)}: the model has no tower for {missing} (it has "
                          f"{towers}); a 'signal' tower needs model.signal.dim > 0 and data.source=synthetic3")
    losses.check_config(r.loss)
    for tower, c in (("vision", r.model.vision), ("text", r.model.text)):
        if c.act not in ACTIVATIONS:
            raise ConfigError(f"model.{tower}.act={c.act!r}: use one of {', '.join(ACTIVATIONS)}")
    if r.model.text.pool not in ("auto", "last", "eos", "argmax", "end"):
        raise ConfigError(f"model.text.pool={r.model.text.pool!r}: use auto, last, eos, argmax or end")
    v = r.model.vision
    if v.pool not in ("token", "map"):
        raise ConfigError(f"model.vision.pool={v.pool!r}: use token (the class token) or map (an attention-pooling "
                          "head)")
    if v.pool == "token" and not v.class_token:
        raise ConfigError("model.vision.pool=token with model.vision.class_token=false: there is no class token to "
                          "pool; set pool=map or class_token=true")
    if not v.proj and not v.pretrained and v.width != r.model.embed_dim:
        raise ConfigError(f"model.vision.proj=false: the pooled vector is the embedding, so model.embed_dim="
                          f"{r.model.embed_dim} must equal model.vision.width={v.width}")
    if len(v.mean) != v.channels or len(v.std) != v.channels or min(v.std) <= 0:
        raise ConfigError(f"model.vision.mean/std: one value per channel ({v.channels}), std > 0")
    if v.patch_dropout and v.pretrained:
        raise ConfigError("model.vision.patch_dropout applies to towerlab's own ViT, not to a pretrained vision tower "
                          "(model.vision.pretrained): set it to 0")
    validate_optim(r.optim, "cuda" if r.train.use_gpu else "cpu", offloading(r))
    validate_scale(r)
    validate_evals(r)
    validate_pretrained(r)
    validate_tokenizer(r)
    if r.tracking.log_models and r.tracking.best_metric:
        from towerlab.train.metrics import logged_metrics

        logged = logged_metrics(r)
        if r.tracking.best_metric not in logged:
            raise ConfigError(f"tracking.best_metric={r.tracking.best_metric} is not logged by this recipe: it logs "
                              f"{', '.join(logged)}.{did_you_mean(r.tracking.best_metric, logged)}")


def validate_pretrained(r: Recipe) -> None:
    """Pretrained towers and freezing: loader names, what they exclude, and freeze patterns that match."""
    from towerlab.hub import LOADERS, parse

    m = r.model
    if m.text.pretrained:
        parse(m.text.pretrained, "model.text.pretrained", ("hf",))
    if tokenizer_spec(r):
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


TOKENIZERS = ("words", "clip_bpe")


def validate_tokenizer(r: Recipe) -> None:
    """model.text.tokenizer: a known name, an embedding table that holds its ids, and no word-vocabulary
    augmentation over BPE ids."""
    from towerlab.data.bpe import VOCAB_SIZE

    t = r.model.text
    if t.tokenizer not in TOKENIZERS:
        raise ConfigError(f"model.text.tokenizer={t.tokenizer!r}: use {' or '.join(TOKENIZERS)}."
                          f"{did_you_mean(t.tokenizer, TOKENIZERS)}")
    if t.tokenizer != "clip_bpe":
        return
    if t.pretrained:
        raise ConfigError(f"model.text.tokenizer=clip_bpe with model.text.pretrained={t.pretrained}: a pretrained "
                          "text tower reads its own tokenizer; drop one of them")
    if t.vocab_size < VOCAB_SIZE:
        raise ConfigError(f"model.text.tokenizer=clip_bpe has {VOCAB_SIZE} token ids but model.text.vocab_size="
                          f"{t.vocab_size}: set model.text.vocab_size={VOCAB_SIZE}")
    a = r.data.augment
    if a.token_mask or a.stopword_removal:
        raise ConfigError("data.augment.token_mask / stopword_removal act on the word vocabulary's ids, not on "
                          "model.text.tokenizer=clip_bpe's: turn them off")


def data_dir(r: Recipe) -> Path | str:
    """Where the run's shards live: data.path (a directory or a URI), or data/<source> for a built-in source."""
    if r.data.path and is_uri(r.data.path):
        return r.data.path
    return Path(r.data.path or Path("data") / r.data.source).absolute()
