"""Models: towers, the multi-tower contrastive model, and architecture files found by scanning archs/."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from towerlab.models.model import ContrastiveModel, no_weight_decay
from towerlab.registry import Registry

ARCH_DIR = Path(__file__).parent / "archs"


@cache
def archs() -> Registry[Path]:
    """Every architecture file in archs/, by name; its first comment line is its help."""
    reg: Registry[Path] = Registry("architecture")
    for path in sorted(ARCH_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        reg.register(path.stem, help=first.lstrip("# ").strip())(path)
    return reg


@cache
def arch_preset(name: str) -> dict:
    """The values of architecture file `name`: a preset for a recipe's model section."""
    with open(archs().get(name)) as f:
        return {"arch": name, **yaml.safe_load(f)}


__all__ = ["ARCH_DIR", "ContrastiveModel", "arch_preset", "archs", "no_weight_decay"]
