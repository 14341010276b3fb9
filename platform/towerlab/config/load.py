"""Loading a recipe: schema defaults <- variant presets <- recipe YAML <- `a.b.c=value` overrides -> a typed Recipe.

Variants are resolved before the merge: the section's `name`-like key (e.g. `loss.name`, `model.arch`) is read from
the recipe and overrides first, and the schema of that variant (a dataclass from a registry entry, or preset values
from an architecture file) is put in place; only then does OmegaConf merge and type-check everything. Every failure
becomes a ConfigError naming the key path, what was expected and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, EnumNode, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from towerlab.config.errors import ConfigError
from towerlab.registry import Registry, RegistryError


@dataclass(frozen=True)
class Variant:
    """How to resolve one section: `key` names the variant inside section `section`.

    Either `registry` (entries carry a config dataclass, e.g. losses) or `preset` (a function returning a dict of
    values for the section's fixed schema, e.g. architecture files) is given.
    """

    section: str
    key: str
    registry: Registry | None = None
    preset: Callable[[str], Mapping[str, Any]] | None = None
    names: Callable[[], Sequence[str]] | None = None


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form key.path=value (e.g. train.steps=50)")
    import yaml

    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e.msg}") from None
    except yaml.YAMLError as e:  # a value YAML reads as a broken flow sequence or mapping, e.g. [a/{0..1}.tar]
        first = " ".join(str(e).split())[:200]
        raise ConfigError(f"cannot parse overrides {list(overrides)} ({first}): quote a value holding [ ] {{ }} "
                          "or commas, e.g. 'data.paths=[\"s3://b/{000..009}.tar\"]'") from None


def read_yaml(path: str | os.PathLike) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file '{p}' not found (see `towerlab recipes ls` for the bundled ones)")
    try:
        cfg = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends: the message names line and column
        first = str(e).strip().splitlines()
        raise ConfigError(f"{p}: not valid YAML: {' '.join(s.strip() for s in first[:3])}") from None
    if cfg is None or isinstance(cfg, DictConfig) and not cfg:
        raise ConfigError(f"{p}: empty: a recipe names at least its sections (see recipes/debug.yaml), or "
                          "`towerlab recipes ls` for the bundled ones")
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{p}: a recipe is a YAML mapping of sections (name, data, model, loss, ...)")
    return cfg


def _select(cfgs: Sequence[DictConfig], dotted: str) -> Any:
    """The last value given for `dotted` among raw configs (later ones win), or None."""
    value = None
    for c in cfgs:
        v = OmegaConf.select(c, dotted, default=None, throw_on_missing=False)
        if v is not None:
            value = v
    return value


def _closest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _keys_at(schema: DictConfig, path: str) -> list[str]:
    node = OmegaConf.select(schema, path) if path else schema
    if node is None and "." in path:  # an entry of a dict of dataclasses (e.g. evals.NAME): its type's fields
        parent = OmegaConf.select(schema, path.rpartition(".")[0])
        element = parent._metadata.element_type if isinstance(parent, DictConfig) else None
        if dataclasses.is_dataclass(element):
            return [f.name for f in dataclasses.fields(element)]
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _node(schema: DictConfig, dotted: str) -> Any:
    """The schema's node (not its value) at a dotted key, or None."""
    node: Any = schema
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


def _check_sections(raw: DictConfig, schema: DictConfig, source: str, prefix: str = "") -> None:
    """A scalar or a list where the schema has a section (`train=3`, `loss=clip`, `evals=[zeroshot]`): named here,
    since OmegaConf's merge reports it without the key (or as a TypeError)."""
    for key in raw.keys():
        dotted = f"{prefix}{key}"
        node = _node(schema, dotted)
        if not isinstance(node, DictConfig):
            continue
        value = raw._get_node(key)
        if isinstance(value, DictConfig):
            _check_sections(value, schema, source, f"{dotted}.")
        elif value is not None and not (hasattr(value, "_is_none") and value._is_none()):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value._value()
            keys = [str(k) for k in node.keys()]
            hint = (f"did you mean {dotted}.name={shown}? " if "name" in keys and isinstance(shown, str) else "")
            raise ConfigError(f"{source}: '{dotted}' is a section, not {shown!r}: {hint}give it as a mapping of its "
                              f"keys or as dotted overrides like {dotted}.{keys[0] if keys else 'NAME'}=... "
                              f"(keys: {', '.join(keys) or 'names of your choice'})")


def _translate(e: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    full = str(getattr(e, "full_key", "") or "")
    node = _node(schema, full)
    if isinstance(e, ValidationError) and isinstance(node, EnumNode):  # a value outside an Enum field's set
        value = "" if getattr(e, "value", None) is None else str(e.value)
        valid = [m.name for m in node.enum_type]
        return ConfigError(f"{source}: {full}={value!r} is not allowed.{_closest(value, valid)} "
                           f"Use one of: {', '.join(valid)}")
    if isinstance(e, ConfigKeyError) or "Key '" in str(e) and "not in" in str(e):
        parent, _, leaf = full.rpartition(".")
        valid = _keys_at(schema, parent)
        where = f"in '{parent}'" if parent else "at the top level"
        inner = getattr(e, "object_type", None)
        if not parent and dataclasses.is_dataclass(inner) and inner is not OmegaConf.get_type(schema):
            # an entry of a list of sections (data.sources): OmegaConf's key lost the list's path
            valid, where = [f.name for f in dataclasses.fields(inner)], f"in a list entry of {inner.__name__}"
        return ConfigError(
            f"{source}: unknown key '{full}'.{_closest(leaf, valid)} Valid keys {where}: {', '.join(valid)}"
        )
    if isinstance(e, ValidationError):
        expected = getattr(e, "ref_type", None) or ""
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        return ConfigError(f"{source}: wrong type for '{full}': {msg} {expected}".strip())
    return ConfigError(f"{source}: {(getattr(e, 'msg', None) or str(e)).splitlines()[0]} (key '{full}')")


def load_structured(
    schema_cls: type,
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    variants: Sequence[Variant] = (),
    base: Mapping[str, Any] | None = None,
) -> Any:
    """Merge schema <- variant presets <- base <- YAML file <- overrides; return the plain dataclass object."""
    raw = [OmegaConf.create(dict(base or {}))]
    if path is not None:
        raw.append(read_yaml(path))
    over = parse_overrides(overrides)
    raw.append(over)
    source = str(path) if path is not None else "overrides"

    schema = OmegaConf.structured(schema_cls)
    for v in variants:
        name = _select(raw, f"{v.section}.{v.key}")
        if name is None:
            name = OmegaConf.select(schema, f"{v.section}.{v.key}", default=None)
        if name is None:
            raise ConfigError(f"{source}: '{v.section}.{v.key}' is required (one of: {', '.join(_names(v))})")
        try:
            if v.registry is not None:
                cfg_cls = v.registry.entry(str(name)).config
                node = OmegaConf.structured(cfg_cls)
                OmegaConf.set_struct(node, True)
                schema[v.section] = node
            if v.preset is not None:
                schema[v.section] = OmegaConf.merge(schema[v.section], v.preset(str(name)))
        except RegistryError as e:
            raise ConfigError(f"{source}: '{v.section}.{v.key}': {e}") from None
    OmegaConf.set_struct(schema, True)
    _open_free_dicts(schema)
    for r in raw:
        _check_sections(r, schema, source)
    try:
        merged = OmegaConf.merge(schema, *raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _translate(e, schema, source) from None


def _open_free_dicts(node: DictConfig) -> None:
    """Struct mode (unknown keys are errors) for dataclass nodes only: a `dict[str, Any]` field such as a sweep's
    search space takes any key."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_free_dicts(child)


def _names(v: Variant) -> list[str]:
    if v.registry is not None:
        return v.registry.names()
    return list(v.names()) if v.names else []


def to_dict(obj: Any) -> dict:
    """A dataclass tree as plain dict (for YAML artifacts and MLflow params)."""
    # Enum members as their names (= values): plain strings in YAML, JSON and MLflow params
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
