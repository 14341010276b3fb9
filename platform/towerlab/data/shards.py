"""Writing and verifying prepared datasets: Parquet shards per split plus a manifest.

Layout of a prepared directory:
    manifest.json            counts, per-shard sha256, the classes and prompts, the tokenizer vocabulary,
                             and a fingerprint (a hash of all shard checksums) that MLflow records per run
    train/part-00000.parquet columns: id (int64), image (PNG bytes), caption (string), label (int64)
    heldout/part-00000.parquet

The whole directory is written under a temporary name and renamed into place, so an interrupted prepare never
leaves a half-written dataset where training would find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from towerlab.config.errors import ConfigError
from towerlab.data.tokenizer import build_vocab

MANIFEST = "manifest.json"
FORMAT = "towerlab-shards/1"
SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("caption", pa.string()), ("label", pa.int64())])


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    @property
    def vocab(self) -> list[str]:
        return self.data["vocab"]

    @property
    def classes(self) -> dict:
        return self.data["classes"]

    def count(self, split: str) -> int:
        return self.data["counts"][split]

    def files(self, split: str) -> list[str]:
        if split not in self.data["splits"]:
            raise ConfigError(f"{self.root}: no '{split}' split (has {', '.join(self.data['splits'])})")
        return [str(self.root / s["file"]) for s in self.data["splits"][split]]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_split(rows: list[dict], root: Path, split: str, shards: int) -> list[dict]:
    (root / split).mkdir(parents=True)
    n = max(1, min(shards, len(rows)))
    entries = []
    for k in range(n):
        part = rows[k::n]  # round-robin keeps every shard's class mix alike
        table = pa.Table.from_pylist(part, schema=SCHEMA)
        rel = f"{split}/part-{k:05d}.parquet"
        pq.write_table(table, root / rel)
        entries.append({"file": rel, "rows": len(part), "sha256": sha256_file(root / rel)})
    return entries


def write_dataset(out: str | os.PathLike, source: str, splits: dict[str, list[dict]], classes: dict, shards: int,
                  extra: dict | None = None) -> Manifest:
    """Write `splits` as shards with a manifest, atomically: build in a temporary sibling, then rename."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = {split: _write_split(rows, tmp, split, shards) for split, rows in splits.items()}
        vocab_text = [r["caption"] for r in splits.get("train", [])]
        vocab_text += [p for prompts in classes.get("prompts", []) for p in prompts]
        fingerprint = hashlib.sha256(
            "".join(e["sha256"] for split in sorted(entries) for e in entries[split]).encode()
        ).hexdigest()
        manifest = {
            "format": FORMAT,
            "source": source,
            "counts": {s: len(r) for s, r in splits.items()},
            "splits": entries,
            "classes": classes,
            "vocab": build_vocab(vocab_text),
            "fingerprint": fingerprint,
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(out, manifest)


def read_manifest(path: str | os.PathLike, verify: bool = False) -> Manifest:
    root = Path(path).absolute()
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ConfigError(
            f"no prepared dataset at '{root}' (missing {MANIFEST}): run `towerlab data prepare SOURCE --out {path}`"
        )
    try:
        data = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{mpath} is corrupt ({e.msg} at line {e.lineno}): prepare the dataset again") from None
    if data.get("format") != FORMAT:
        raise ConfigError(f"{mpath}: unknown format {data.get('format')!r} (expected {FORMAT}): prepare it again")
    m = Manifest(root, data)
    if verify:
        for split, entries in data["splits"].items():
            for e in entries:
                f = root / e["file"]
                if not f.is_file():
                    raise ConfigError(f"shard {f} is missing: restore it or prepare the dataset again")
                if sha256_file(f) != e["sha256"]:
                    raise ConfigError(f"shard {f} does not match its checksum in {MANIFEST}: it is corrupt or was "
                                      "changed; prepare the dataset again")
    return m
