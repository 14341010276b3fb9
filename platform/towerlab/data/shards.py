"""Writing and verifying prepared datasets: Parquet shards per split plus a manifest.

Layout of a prepared directory:
    manifest.json            counts, per-shard sha256, the classes and prompts, the tokenizer vocabulary,
                             and a fingerprint (a hash of all shard checksums) that MLflow records per run
    train/part-00000.parquet columns: id (int64), image (PNG bytes), caption (string), label (int64)
    heldout/part-00000.parquet

towerlab deletes only what it wrote. A new directory is written under a temporary name and renamed into place. An
existing directory is written into only when it is empty or already a towerlab dataset (its manifest, or the state
file of an interrupted prepare, lists the files towerlab owns there); then only those files are replaced or removed,
each written under a temporary name and renamed, and anything else a user put there stays. A non-empty directory
that is not a towerlab dataset (a typo in --out or data.path, or `.`) is refused before anything is written. The
manifest is removed first and written last, so an interrupted prepare never leaves a half-written dataset where
training would find it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from towerlab.config.errors import ConfigError
from towerlab.data.location import Location, resolve
from towerlab.data.tokenizer import build_vocab

MANIFEST = "manifest.json"
FORMAT = "towerlab-shards/1"
# an unfinished prepare: the files it owns (and, for data/folder.py, the shards it finished, to resume from)
STATE = ".prepare-state.json"
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

    @property
    def counts(self) -> dict[str, int]:
        """Records per split ({"train": ..., "heldout": ...})."""
        return self.data["counts"]

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    @property
    def skipped(self) -> list[dict]:
        """Shards left out under data.bad_shards=skip: [{file, rows, problem}]."""
        return self.data.get("skipped", [])

    @property
    def signal_dim(self) -> int | None:
        """Features per record of the third modality (synthetic3), None without one."""
        return self.data.get("signal_dim")

    @property
    def foreign(self) -> bool:
        """Shards towerlab did not write (img2dataset, Hugging Face Parquet), listed in place (data/foreign.py)."""
        return bool(self.data.get("foreign"))

    def skip(self, split: str, entry: dict, problem: str) -> None:
        """Leave shard `entry` of `split` out (data.bad_shards=skip): its rows leave the counts, and `skipped`
        says which shard and why."""
        self.data["splits"][split] = [e for e in self.data["splits"][split] if e is not entry]
        self.data["counts"][split] -= entry["rows"]
        self.data.setdefault("skipped", []).append({"file": entry["file"], "rows": entry["rows"], "problem": problem})

    def count(self, split: str) -> int:
        return self.counts[split]

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


def _write_split(rows: list[dict], root: Path, files: list[str]) -> list[dict]:
    (root / files[0]).parent.mkdir(exist_ok=True)
    entries = []
    for k, rel in enumerate(files):
        part = rows[k::len(files)]  # round-robin keeps every shard's class mix alike
        table = pa.Table.from_pylist(part, schema=SCHEMA.append(SIGNAL) if part and "signal" in part[0] else SCHEMA)
        tmp = _temp_name(root / rel)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, root / rel)
        finally:
            tmp.unlink(missing_ok=True)
        entries.append({"file": rel, "rows": len(part), "sha256": sha256_file(root / rel)})
    return entries


def _temp_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (also data/formats.py's pattern)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: Path, obj: dict) -> None:
    """Write a JSON file atomically: a temporary sibling, then renamed."""
    tmp = _temp_name(path)
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _load_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _inside(rel: object) -> bool:
    """A manifest's file name that stays inside the dataset directory (a doctored one could name ../anything)."""
    if not isinstance(rel, str) or not rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def owned_files(out: Path) -> set[str] | None:
    """The files towerlab wrote in directory `out` (relative to it): those its manifest lists, plus those an
    unfinished prepare's state file lists. None when `out` holds neither in towerlab's format: then nothing in it
    is towerlab's."""
    owned = None
    manifest = _load_json(out / MANIFEST) if (out / MANIFEST).is_file() else None
    if manifest and manifest.get("format") == FORMAT and isinstance(manifest.get("splits"), dict):
        owned = {MANIFEST} | {e.get("file") for es in manifest["splits"].values() if isinstance(es, list)
                              for e in es if isinstance(e, dict) and isinstance(e.get("file"), str)}
    state = _load_json(out / STATE) if (out / STATE).is_file() else None
    # state files written before they carried the format have a source_fingerprint (data/folder.py's resume key)
    if state and (state.get("format") == FORMAT or "source_fingerprint" in state) \
            and isinstance(state.get("shards"), dict):
        listed = state.get("owned") if isinstance(state.get("owned"), list) else []
        owned = (owned or set()) | {STATE} | set(state["shards"]) | {f for f in listed if isinstance(f, str)}
    return None if owned is None else {f for f in owned if _inside(f)}


def claim_target(out: Path, planned: set[str], key: str | None = None) -> set[str]:
    """Check that a prepare may write the files `planned` (relative to `out`) into directory `out`, before anything
    is written: `out` must be absent, empty, or a towerlab dataset (or an unfinished prepare), and no planned file
    may already be there unless towerlab wrote it. Returns the files towerlab owns there (it may replace or remove
    those, and only those). Anything else is a ConfigError and nothing is touched."""
    where = f"{key} {out}" if key else str(out)
    fix = ("choose an empty or new directory (--out of `towerlab data prepare`, data.path of `towerlab train`)"
           if key is None else "choose an empty or new directory")
    if not out.exists():
        return set()
    if not out.is_dir():
        raise ConfigError(f"{where} is a file, not a directory: {fix}")
    owned = owned_files(out)
    if owned is None:
        if any(out.iterdir()):
            raise ConfigError(f"{where} is not empty and holds no towerlab dataset (no towerlab {MANIFEST}); towerlab "
                              f"writes a dataset only into an empty or new directory and left this one untouched: "
                              f"{fix}")
        return set()
    clashes = [rel for rel in sorted(planned - owned) if (out / rel).exists() or (out / rel).is_symlink()]
    clashes += [str(d) for d in sorted({PurePosixPath(rel).parent for rel in planned} - {PurePosixPath(".")})
                if (out / d).exists() and not (out / d).is_dir()]
    if clashes:
        raise ConfigError(f"{where} holds {clashes[0]}, which towerlab did not write and would overwrite: move it "
                          f"away or {fix}")
    return owned


def remove_owned(out: Path, files: set[str]) -> None:
    """Delete `files` (relative to `out`, all written by towerlab) and the temporary copies an interrupted write of
    them left; then the directories they were in, if that left them empty. Nothing else in `out` is touched."""
    dirs = set()
    for rel in sorted(files):
        p = out / rel
        if p.is_file() or p.is_symlink():
            p.unlink()
        if p.parent.is_dir():
            for tmp in p.parent.glob(f".{glob.escape(p.name)}.tmp-*"):
                tmp.unlink()
        if p.parent != out:
            dirs.add(p.parent)
    for d in sorted(dirs, reverse=True):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def write_dataset(out: str | os.PathLike, source: str, splits: dict[str, list[dict]], classes: dict, shards: int,
                  extra: dict | None = None, key: str | None = None) -> Manifest:
    """Write `splits` as shards with a manifest. A new directory is built under a temporary sibling name and renamed
    into place; an existing one must be empty or a towerlab dataset (claim_target: anything else is refused, `key`
    names the option in that message), and there only towerlab's own files are replaced, each atomically, with
    the manifest removed first and written last."""
    out = Path(out).absolute()
    files = {split: [f"{split}/part-{k:05d}.parquet" for k in range(max(1, min(shards, len(rows))))]
             for split, rows in splits.items()}
    planned = {MANIFEST, STATE} | {f for fs in files.values() for f in fs}
    owned = claim_target(out, planned, key)
    if out.exists():
        write_json(out / STATE, {"format": FORMAT, "owned": sorted(owned | planned), "shards": {}})
        # the old dataset stops being trainable before any shard changes; the state file keeps the directory
        # recognisably towerlab's if this run is interrupted
        (out / MANIFEST).unlink(missing_ok=True)
        manifest = _shards_and_manifest(out, source, splits, files, classes, extra)
        remove_owned(out, owned - planned)
        write_json(out / MANIFEST, manifest)
        (out / STATE).unlink()
        return Manifest(out, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _shards_and_manifest(tmp, source, splits, files, classes, extra)
        write_json(tmp / MANIFEST, manifest)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(out, manifest)


def _shards_and_manifest(root: Path, source: str, splits: dict[str, list[dict]], files: dict[str, list[str]],
                         classes: dict, extra: dict | None) -> dict:
    """Write every split's shards under `root`; return the manifest describing them."""
    entries = {split: _write_split(rows, root, files[split]) for split, rows in splits.items()}
    first = next((rows[0] for rows in splits.values() if rows), {})
    if "signal" in first:
        extra = {"columns": ["image", "caption", "label", "signal"], "signal_dim": len(first["signal"]),
                 **(extra or {})}
    vocab_text = [r["caption"] for r in splits.get("train", [])]
    vocab_text += [p for prompts in classes.get("prompts", []) for p in prompts]
    fingerprint = hashlib.sha256(
        "".join(e["sha256"] for split in sorted(entries) for e in entries[split]).encode()
    ).hexdigest()
    return {
        "format": FORMAT,
        "source": source,
        "counts": {s: len(r) for s, r in splits.items()},
        "splits": entries,
        "classes": classes,
        "vocab": build_vocab(vocab_text),
        "fingerprint": fingerprint,
        **(extra or {}),
    }


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
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{mname}: unknown format {found!r} (expected {FORMAT}): prepare it again")
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
