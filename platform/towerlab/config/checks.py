"""Value checks of a loaded recipe: the one validation layer between OmegaConf's type checks and the run.

OmegaConf already refuses unknown keys, wrong types and (for Enum fields) values outside the allowed set. What it
cannot check is declared here or next to the field:

- a numeric field's range is data on the field itself, `lr: float = num(1e-3, gt=0)`, so the schema says what is
  allowed and `check_ranges` enforces it for every section (recipe sections and loss configs alike);
- rules that relate keys of one section are one function per section (`check_data`, `check_model`, ...);
- `check_recipe` runs them all, in section order. towerlab.train.recipe.validate calls it, then the checks that need
  the registries (data sources, loss families, evaluators), which config/ may not import.

Every failure is a ConfigError of one line: `dotted.key=value: what is required` and, where it helps, the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from towerlab.config.batch import resolve_batch
from towerlab.config.errors import ConfigError

INT64_MAX = 2**63 - 1  # seeds and counts end up in int64 tensors and numpy generators


@dataclass(frozen=True)
class Range:
    """Closed or open bounds of a number (None: unbounded on that side); NaN and infinities are never inside."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # appended to the message, e.g. what the bounds come from

    def __contains__(self, v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self, value: Any = 0) -> str:
        """What is required, e.g. "must be in [0, 1)"; for a NaN or infinite `value`, that it is not finite."""
        finite = not isinstance(value, float) or math.isfinite(value)
        return ("" if finite else "not a finite number; ") + self._bounds() + (f" ({self.why})" if self.why else "")

    def _bounds(self) -> str:
        lo, hi = _show(self.lo), _show(self.hi)
        if self.hi is None:
            if self.lo is None:
                return "must be a finite number"
            return f"must be > {lo}" if self.lo_open else f"must be at least {lo}"
        if self.lo is None:
            return f"must be < {hi}" if self.hi_open else f"must be at most {hi}"
        return f"must be in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def num(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, why: str = "",
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose number (or every number of its list) must lie in the given bounds; None, where the
    field is Optional, is always allowed."""
    rng = Range(gt if gt is not None else ge, lt if lt is not None else le, gt is not None, lt is not None, why)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"range": rng})


def field_range(cls: type, name: str) -> Range | None:
    """The declared range of field `name` of dataclass `cls`, or None. A subclass that declares the field again
    (to change its default) keeps the range of the class that declared it first."""
    for c in cls.__mro__:
        f = getattr(c, "__dataclass_fields__", {}).get(name)
        if f is not None and "range" in f.metadata:
            return f.metadata["range"]
    return None


def fail(key: str, value: Any, rule: str) -> ConfigError:
    shown = repr(value) if isinstance(value, str) else _show(value)
    return ConfigError(f"{key}={shown}: {rule}")


def check_ranges(obj: Any, prefix: str) -> None:
    """Every ranged field of dataclass `obj` and of the dataclasses inside it (fields, dict values) lies in its
    range; the first one that does not is a ConfigError naming its dotted key."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(obj, f.name)
        rng = field_range(type(obj), f.name)
        if rng is not None and value is not None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v not in rng:
                    raise fail(key, value, rng.describe(v))
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    check_ranges(v, f"{key}.{k}")
        elif isinstance(value, (list, tuple)):  # data.sources: a list of sections
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    check_ranges(v, f"{key}[{i}]")


def check_sources(d) -> None:
    """data.sources, a weighted mixture of foreign corpora: instead of data.path/paths, each with a path, and
    weights that differ only where shards are drawn with replacement."""
    if d.path or d.paths:
        raise ConfigError("data.sources and data.path/data.paths are both set: name every corpus in data.sources "
                          "([{path: ..., weight: ...}, ...]) or the shards in data.path, not both (data.path=null "
                          "drops a recipe file's)")
    if d.source not in ("webdataset", "parquet"):
        raise ConfigError(f"data.sources mixes foreign corpora (data.source=webdataset or parquet), not "
                          f"{d.source}: set data.source=webdataset or parquet")
    for i, s in enumerate(d.sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path is empty: give the corpus's directory, brace pattern or shard")
    if not d.resampled and len({s.weight for s in d.sources}) > 1:
        raise ConfigError(f"data.sources weights {[s.weight for s in d.sources]} differ but data.resampled=false: "
                          "a weighted mixture draws shards with replacement: set data.resampled=true, or equal "
                          "weights (the corpora one after the other)")
    if d.num_samples is not None and not d.resampled:
        raise ConfigError("data.num_samples with data.sources is the size of a resampled epoch, but "
                          "data.resampled=false: set each corpus's count as data.sources[i].num_samples, or "
                          "data.resampled=true")


def check_data(d) -> None:
    if d.sources:
        check_sources(d)
        return check_keys(d)
    if d.source == "parquet" and not (d.path or d.paths):
        raise ConfigError("data.source=parquet needs data.path: a directory from `towerlab data prepare`, or image-bytes "
                          "Parquet files (img2dataset's or Hugging Face datasets'): a directory, a brace pattern or "
                          "several in data.paths")
    if d.source == "webdataset" and not (d.path or d.paths):
        raise ConfigError("data.source=webdataset needs data.path: a directory from `towerlab data prepare`, a "
                          "directory of WebDataset .tar shards (img2dataset's output), a brace pattern such as "
                          "/data/{00000..00099}.tar, or several in data.paths")
    if d.paths and d.source not in ("webdataset", "parquet"):
        raise ConfigError(f"data.paths is for data.source=webdataset or parquet (foreign shards), not "
                          f"{d.source}: use data.path")
    if d.paths and d.path:
        raise ConfigError("data.path and data.paths are both set: give the shard locations in one of them")
    if d.heldout_shards and d.source not in ("webdataset", "parquet"):
        raise ConfigError(f"data.heldout_shards holds out foreign shards (data.source=webdataset or parquet); "
                          f"data.source={d.source} has its own held-out split: set data.heldout_shards=0")
    check_keys(d)


def check_keys(d) -> None:
    if not d.image_keys or not all(k and "." not in k for k in d.image_keys):
        raise ConfigError(f"data.image_keys={list(d.image_keys)}: give member suffixes without dots, e.g. [jpg, png]")
    if not d.caption_key or "." in d.caption_key:
        raise ConfigError(f"data.caption_key={d.caption_key!r}: give a member suffix without a dot, e.g. txt")
    if d.resampled and d.source not in ("webdataset", "parquet"):
        raise ConfigError(f"data.resampled=true draws foreign shards with replacement; data.source={d.source} has "
                          "none: use data.source=webdataset or parquet, or data.resampled=false")


def check_model(m) -> None:
    v = m.vision
    if v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size={v.image_size} is not a multiple of model.vision.patch_size="
                          f"{v.patch_size}: change one of them")
    for tower, c in (("vision", v), ("text", m.text)):
        if c.width % c.heads:
            raise ConfigError(f"model.{tower}.width={c.width} is not divisible by model.{tower}.heads={c.heads}")


def check_optim(o) -> None:
    if len(o.betas) != 2:
        raise fail("optim.betas", list(o.betas), "AdamW takes two betas, e.g. optim.betas=[0.9,0.98]")


def check_train(t) -> None:
    if t.zero_stage not in (0, 1, 2, 3):
        raise fail("train.zero_stage", t.zero_stage, "DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if t.precision == "bf16" and not t.use_gpu:
        raise ConfigError("train.precision=bf16 on CPU: bf16 matmuls are far slower than fp32 there; use fp32 or auto")


NAME_MAX = 100  # a directory under storage_path and an MLflow run name: well inside both limits


def check_name(name: str, what: str = "run") -> None:
    """A run or sweep name becomes a directory under storage_path and an MLflow run name."""
    if (not name or name in (".", "..") or len(name) > NAME_MAX or any(c in name for c in "/\\")
            or not name.isprintable()):
        raise fail("name", name if len(name) <= 40 else name[:40] + "...",
                   f"a {what} name is 1 to {NAME_MAX} printable characters, not '.' or '..', without '/' or "
                   "'\\' (it names a directory and an MLflow run)")


def check_recipe(r) -> None:
    """Every schema-level check of a resolved Recipe (ranges of every section, then each section's rules)."""
    check_ranges(r, "")
    resolve_batch(r.data.global_batch, r.train.workers, r.data.micro_batch)
    check_data(r.data)
    check_model(r.model)
    check_optim(r.optim)
    check_train(r.train)
    check_name(r.name)
