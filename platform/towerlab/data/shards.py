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
from towerlab.data.location import Location, resolve
from towerlab.data.tokenizer import build_vocab

MANIFEST = "manifest.json"
FORMAT = "towerlab-shards/1"
SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("caption", pa.string()), ("label", pa.int64())])
# a third modality of the built-in synthetic3 source: one float vector per record (see data/synthetic.py)
SIGNAL = pa.field("signal", pa.list_(pa.float32()))


@dataclass(frozen=True)
class Manifest:
    root: Path  # the local directory (for a URI: the path inside its filesystem)
    data: dict[str, Any]
    location: Location | None = None  # how to reach the files; None: the local directory `root`

    @property
    def loc(self) -> Location:
        return self.location or resolve(self.root)

    @property
    def uri(self) -> str:
        """What to hand to another process to find this dataset again (a local path or the URI)."""
        return self.loc.display

    @property
    def shard_format(self) -> str:
        return self.data.get("shard_format", "parquet")

    @property
    def columns(self) -> list[str]:
        return self.data.get("columns", ["image", "caption", "label"])

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
        return [self.loc.path(s["file"]) for s in self.data["splits"][split]]

    def nbytes(self, split: str) -> int | None:
        """Total bytes of a split's shards when the manifest records them (prepare images does)."""
        sizes = [s.get("bytes") for s in self.data["splits"].get(split, [])]
        return None if None in sizes else sum(sizes)


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
        table = pa.Table.from_pylist(part, schema=SCHEMA.append(SIGNAL) if part and "signal" in part[0] else SCHEMA)
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
        first = next((rows[0] for rows in splits.values() if rows), {})
        if "signal" in first:
            extra = {"columns": ["image", "caption", "label", "signal"], "signal_dim": len(first["signal"]),
                     **(extra or {})}
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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: str | os.PathLike, verify: bool = False, bad_shards: str = "error") -> Manifest:
    """The manifest of a prepared dataset (a local directory or a URI). With `verify`, every shard's sha256 is
    checked: a missing or mismatching shard is a ConfigError naming it, or with bad_shards="skip" it is left out
    (the manifest's counts shrink and data["skipped"] lists what was skipped and why)."""
    loc = resolve(path)
    mname = loc.name(MANIFEST)
    if not loc.exists(MANIFEST):
        raise ConfigError(
            f"no prepared dataset at '{loc.display}' (missing {MANIFEST}): run `towerlab data prepare SOURCE --out "
            f"{path}` (or `towerlab data prepare images ...`)"
        )
    try:
        data = json.loads(loc.read_bytes(MANIFEST))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{mname} is corrupt ({e.msg} at line {e.lineno}): prepare the dataset again") from None
    if data.get("format") != FORMAT:
        raise ConfigError(f"{mname}: unknown format {data.get('format')!r} (expected {FORMAT}): prepare it again")
    if bad_shards not in ("error", "skip"):
        raise ConfigError(f"data.bad_shards={bad_shards!r}: use error or skip")
    root = Path(loc.base)
    if verify:
        skipped = []
        for split, entries in data["splits"].items():
            kept = []
            for e in entries:
                problem = _shard_problem(loc, e)
                if problem is None:
                    kept.append(e)
                elif bad_shards == "skip":
                    skipped.append({"file": e["file"], "rows": e["rows"], "problem": problem})
                    data["counts"][split] -= e["rows"]
                else:
                    raise ConfigError(f"shard {loc.name(e['file'])} {problem}; restore it, prepare the dataset "
                                      "again, or set data.bad_shards=skip to train without it")
            data["splits"][split] = kept
        if skipped:
            data["skipped"] = skipped
    return Manifest(root, data, loc)


def _shard_problem(loc: Location, entry: dict) -> str | None:
    if not loc.exists(entry["file"]):
        return "is missing"
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path(entry["file"])) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != entry["sha256"]:
        return f"does not match its checksum in {MANIFEST} (corrupt or changed)"
    return None
