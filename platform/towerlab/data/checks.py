"""Checks of the data section of a recipe (augmentation strengths, captions per image, bad-shard policy): each
failure names the key, the value and the valid range."""

from __future__ import annotations

from towerlab.config.errors import ConfigError
from towerlab.config.schema import DataConfig

# key -> (low, high, inclusive high): strengths and probabilities
RANGES = {
    "colour_jitter_strength": (0.0, 1.0),
    "token_mask_prob": (0.0, 1.0),
    "stopword_prob": (0.0, 1.0),
    "crop_scale_min": (0.0, 1.0),
}


def validate_data(d: DataConfig) -> None:
    for key, (lo, hi) in RANGES.items():
        v = getattr(d.augment, key)
        if not lo <= v <= hi or v != v:
            raise ConfigError(f"data.augment.{key}={v}: must be between {lo} and {hi}")
    if d.augment.crop_scale_min == 0:
        raise ConfigError("data.augment.crop_scale_min=0: must be above 0 (the crop's smallest area fraction)")
    if d.captions_per_image < 1:
        raise ConfigError(f"data.captions_per_image={d.captions_per_image}: must be at least 1")
    if d.bad_shards not in ("error", "skip"):
        raise ConfigError(f"data.bad_shards={d.bad_shards!r}: use error (stop, naming the shard) or skip")
    if d.num_samples is not None and d.num_samples < 1:
        raise ConfigError(f"data.num_samples={d.num_samples}: must be at least 1 (or null: counted from the shards)")
    if not d.image_keys or not all(k and "." not in k for k in d.image_keys):
        raise ConfigError(f"data.image_keys={list(d.image_keys)}: give member suffixes without dots, e.g. [jpg, png]")
    if not d.caption_key or "." in d.caption_key:
        raise ConfigError(f"data.caption_key={d.caption_key!r}: give a member suffix without a dot, e.g. txt")
    if d.resampled and d.source not in ("webdataset", "parquet"):
        raise ConfigError(f"data.resampled=true draws foreign shards with replacement; data.source={d.source} has "
                          "none: use data.source=webdataset or parquet, or data.resampled=false")
