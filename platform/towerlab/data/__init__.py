"""Data: built-in sources, shard writing and verification, the tokenizer, and the Ray Data pipeline."""

from towerlab.data.shards import Manifest, read_manifest, write_dataset
from towerlab.data.sources import SOURCES, prepare

__all__ = ["Manifest", "SOURCES", "prepare", "read_manifest", "write_dataset"]
