"""The loss library: one module per loss family, registered by name in LOSSES.

    loss_fn = build("clip", label_smoothing=0.1)          # or from_config(recipe.loss)
    out = loss_fn(features, logit_scale=s, logit_bias=b, rank=r, world_size=W, **meta)
    out["loss"].backward()

`features` are all-gathered with gradient (towerlab.losses.gather.all_gather_with_grad); see
towerlab.losses.base for the full call convention. `config_class(name)` gives the family's typed config dataclass,
which the config layer merges as the schema of the recipe's `loss:` section; `loss_class(name)` the family's class,
whose attributes (needs_labels, multi_positive, one_logit_matrix, supports_tiled, uses_bias) say what the rest of
the platform must know about it. Importing this package registers every
family and does nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from torch import nn

from towerlab.config.errors import ConfigError
from towerlab.registry import Registry

LOSSES: Registry = Registry("loss")


def config_class(name: str) -> type:
    """The config dataclass (a LossConfig subclass) of family `name`; unknown name -> RegistryError."""
    cfg = LOSSES.entry(name).config
    assert cfg is not None, f"loss '{name}' registered without a config class"
    return cfg


def loss_class(name: str) -> type:
    """The loss class (a ContrastiveLoss subclass) of family `name`, for its class attributes: e.g.
    `loss_class(recipe.loss.name).multi_positive`; unknown name -> RegistryError."""
    return LOSSES.get(name)


def _check_type(name: str, key: str, value: Any, hint: Any) -> Any:
    """Light type check of one parameter (the config layer does the full one); ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _check_type(name, key, value, args[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"loss.{key}={value!r}: loss '{name}' takes a list here, e.g. loss.{key}=[a,b]")
        return list(value)
    ok = {
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise ConfigError(f"loss.{key}={value!r}: loss '{name}' takes a {hint.__name__} here")
    return float(value) if hint is float else value


def make_config(name: str, **params: Any):
    """The family's config dataclass filled with `params`; an unknown or mistyped parameter is a ConfigError."""
    cls = config_class(name)
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"loss '{name}' has no parameter '{key}'.{hint} Valid: {', '.join(valid)}")
    if params.get("name", name) != name:
        raise ValueError(f"build('{name}', name='{params['name']}'): the two names differ")
    params = {k: _check_type(name, k, v, hints[k]) for k, v in params.items() if k != "name"}
    return cls(name=name, **params)


def check_config(cfg: Any) -> None:
    """The parameter rules of the family `cfg.name` (ranges and the rules between keys) on a config dataclass, e.g.
    the resolved recipe's `loss` section, without building anything: a ConfigError naming the key."""
    loss_class(cfg.name).check_config(cfg)


def build(name: str, **params: Any) -> nn.Module:
    """The loss module of family `name` with config `params` (validated against the family's dataclass)."""
    LOSSES.entry(name)  # unknown name: the registry's message with the valid names
    return LOSSES.get(name)(make_config(name, **params))


def from_config(cfg: Any) -> nn.Module:
    """Build from a LossConfig dataclass instance (e.g. the resolved recipe's `loss` section)."""
    params = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return build(params.pop("name"), **params)


# Registration: every family module registers itself on import (nothing else happens at import time).
from towerlab.losses import (  # noqa: E402,F401
    align_uniform,
    clip,
    cwcl,
    dcl,
    decoupled_softmax,
    gram,
    hard_negative_mixing,
    mw_auc,
    multihead,
    sdm,
    siglip,
    symile,
)
