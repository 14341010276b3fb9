"""Built-in data sources by name: each returns its splits of records and its classes (names and prompts)."""

from __future__ import annotations

import os

from towerlab.data import digits, synthetic
from towerlab.data.shards import Manifest, write_dataset
from towerlab.registry import Registry

SOURCES: Registry = Registry("data source")


@SOURCES.register("digits", help="scikit-learn's 1,797 handwritten digits as captioned images (20% held out)")
def _digits(seed: int = 0, size: int | None = None) -> tuple[dict, dict]:
    return digits.records(seed), digits.classes()


@SOURCES.register("synthetic", help="coloured bars on noise, 8 classes, any size: for fast tests")
def _synthetic(seed: int = 0, size: int | None = None) -> tuple[dict, dict]:
    return synthetic.records(seed, size or 2048), synthetic.classes()


@SOURCES.register("synthetic3", help="synthetic plus a third modality, 'signal' (16 floats): for 3-modality losses")
def _synthetic3(seed: int = 0, size: int | None = None) -> tuple[dict, dict]:
    return synthetic.records(seed, size or 2048, signal_dim=SIGNAL_DIM), synthetic.classes()


SIGNAL_DIM = 16


def prepare(source: str, out: str | os.PathLike, shards: int = 4, seed: int = 0, size: int | None = None,
            key: str | None = None) -> Manifest:
    """Write built-in source `source` as shards under `out`: a new or empty directory, or one holding a towerlab
    dataset, whose own files are replaced atomically; any other directory is refused untouched (`key`, e.g. "--out"
    or "data.path", names the setting in that message)."""
    splits, classes = SOURCES.get(source)(seed=seed, size=size)
    return write_dataset(out, source, splits, classes, shards, extra={"seed": seed}, key=key)
