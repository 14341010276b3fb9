"""The Ray Data pipeline: read_parquet over a split's shards -> decode + augment + tokenize in map_batches.

Workers consume it with `get_dataset_shard("train").iter_torch_batches(...)`, reseeding their local shuffle buffer
every epoch (`epoch_batches`) so every epoch has a new order that a seed reproduces. The same `Preprocessor` serves
evaluation (without augmentation) on the worker, where the held-out split is small enough to read directly.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from towerlab.config.schema import AugmentConfig, Recipe
from towerlab.data.shards import Manifest
from towerlab.data.tokenizer import Tokenizer


class Preprocessor:
    """Turns a batch of {image: PNG bytes, caption: str, label: int} into model inputs (numpy)."""

    def __init__(self, vocab: list[str], image_size: int, context_length: int, vocab_size: int,
                 augment: AugmentConfig | None, seed: int | None = None):
        self.tokenizer = Tokenizer(vocab, context_length, vocab_size)
        self.image_size = image_size
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict) -> dict:
        from towerlab.data.images import decode

        images = np.stack([decode(b, self.image_size, self.augment, self.rng) for b in batch["image"]])
        return {
            "image": images,
            "text": self.tokenizer.encode_batch(batch["caption"]),
            "label": np.asarray(batch["label"], dtype=np.int64),
        }


def preprocessor(recipe: Recipe, manifest: Manifest, train: bool) -> Preprocessor:
    return Preprocessor(manifest.vocab, recipe.model.vision.image_size, recipe.model.text.context_length,
                        recipe.model.text.vocab_size, recipe.data.augment if train else None,
                        seed=None if train else 0)


# Below this many bytes of shards, the raw rows are read once and kept in Ray's object store: every epoch then
# re-runs only decode + augment, not file listing and reading (which dominated small datasets' epochs).
CACHE_RAW_BYTES = 256 << 20


def train_dataset(recipe: Recipe, manifest: Manifest):
    """The training split as a lazy Ray Dataset of model inputs (augmentation re-drawn every epoch)."""
    import ray.data

    pre = preprocessor(recipe, manifest, train=True)
    files = manifest.files("train")
    ds = ray.data.read_parquet(files, columns=["image", "caption", "label"])
    if sum(os.path.getsize(f) for f in files if os.path.exists(f)) < CACHE_RAW_BYTES:
        ds = ds.materialize()
    return ds.map_batches(pre, batch_size=256, concurrency=recipe.data.preprocess_concurrency)


def epoch_batches(shard, recipe: Recipe, micro_batch: int, epoch: int) -> Iterator[dict]:
    """One epoch of torch batches from a worker's dataset shard, in an order seeded by (seed, epoch)."""
    return shard.iter_torch_batches(
        batch_size=micro_batch,
        drop_last=True,
        local_shuffle_buffer_size=recipe.data.shuffle_buffer or None,
        local_shuffle_seed=recipe.seed * 100_003 + epoch if recipe.data.shuffle_buffer else None,
    )


def load_split(manifest: Manifest, split: str, pre: Preprocessor) -> dict[str, np.ndarray]:
    """A whole (small) split, preprocessed without augmentation: evaluation data."""
    table = pq.ParquetDataset(manifest.files(split)).read(columns=["image", "caption", "label"])
    return pre(table.to_pydict())
