"""Foreign corpora read in place: WebDataset shards (`data.source=webdataset` over tars towerlab did not write), the
layout img2dataset writes for LAION, DataComp, CC3M/CC12M and COYO, which OpenCLIP reads as it is; and image-bytes
Parquet (`data.source=parquet` without a manifest.json): img2dataset's `--output_format parquet` (a `jpg` binary
column and `caption`) or Hugging Face datasets' (an `image` struct with `bytes`), column names configurable.

Layout: per sample `<key>.jpg|png|webp` (the image), `<key>.txt` (the caption) and `<key>.json` (url, key, status,
caption, ...), with `<shard>_stats.json` (whose `successes` counts the shard's samples) and `<shard>.parquet` beside
each `<shard>.tar`.

Why a module of its own: at corpus scale the driver must not touch the data. `shard_manifest` only lists shards
(one directory listing, or a brace pattern expanded without a stat) and reads the small `_stats.json` files; it
never opens or hashes a tar unless nothing else gives the sample count. The result is an in-memory `Manifest`
(no manifest.json is written or needed) with one `train` split, so the rest of the pipeline takes one code path.

Reading (`read_train`): each shard is one row of a Ray Dataset, expanded by `read_shard` on Ray Data's workers
(shards split over the readers). Not `ray.data.read_webdataset`: its tar iterator has no hook for a shard that
fails part-way, so an unreadable shard could be neither named in one line nor skipped. Dirty samples (no image, no
or an empty caption) become rows with a `problem`, which the preprocessor drops and counts together with images
that do not decode (data/pipeline.py), so web data never crashes a run.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from towerlab.config.errors import ConfigError
from towerlab.config.schema import DataConfig
from towerlab.data.location import Location, is_uri, resolve
from towerlab.data.shards import FORMAT, MANIFEST, Manifest

# webdataset's rule: the key is everything up to the first dot of the member's base name, the suffix the rest
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
STATS_SUFFIX = "_stats.json"
EXT = {"webdataset": ".tar", "parquet": ".parquet"}
# foreign Parquet columns tried in order when the recipe names none: img2dataset's, then Hugging Face datasets'
IMAGE_COLUMNS = ("jpg", "image", "png", "webp", "jpeg")
CAPTION_COLUMNS = ("caption", "txt", "text")


class ShardError(RuntimeError):
    """A shard that cannot be read, with data.bad_shards=error: its message is the one line a user needs."""


def specs(d: DataConfig) -> list[str]:
    """What the recipe names as shard locations: data.paths, else data.path."""
    return list(d.paths) if d.paths else ([str(d.path)] if d.path else [])


def is_foreign(d: DataConfig) -> bool:
    """data.source=webdataset or parquet over shards without a towerlab manifest.json (a manifest, where present,
    is used)."""
    if d.source not in EXT:
        return False
    named = specs(d)
    if len(named) != 1 or "{" in named[0] or named[0].endswith(EXT[d.source]):
        return True
    try:
        return not resolve(named[0]).exists(MANIFEST)
    except ConfigError:
        return True  # an unknown scheme: list_shards names it


def _expand(spec: str) -> list[str]:
    from braceexpand import braceexpand

    try:
        return list(braceexpand(spec))
    except Exception as e:  # an unbalanced pattern
        raise ConfigError(f"data.path={spec!r}: not a valid brace pattern ({e}); write e.g. /data/{{00000..00099}}.tar")


def list_shards(named: list[str], ext: str = ".tar") -> tuple[pafs.FileSystem, list[str], dict[str, int | None],
                                                              list[str]]:
    """(filesystem, shard paths inside it, their sizes where a listing gave them, directories listed). Directories
    are listed once (non-recursively, *`ext`); brace patterns and names ending in `ext` are taken as they are,
    unopened."""
    if not named:
        raise ConfigError("data.source=webdataset needs data.path (a directory of .tar shards, a brace pattern such as "
                          "/data/{00000..00099}.tar, or a prepared directory) or data.paths")
    fs, scheme = None, None
    files: list[str] = []
    sizes: dict[str, int | None] = {}
    listed: list[str] = []
    for spec in named:
        for item in _expand(spec):
            where = urlsplit(item)[:2] if is_uri(item) else ("", "")
            if scheme is None:
                scheme = where
            elif where[0] != scheme[0]:
                raise ConfigError(f"data.paths mixes filesystems ({scheme[0] or 'local'} and {where[0] or 'local'}: "
                                  f"{item}): keep one filesystem per run")
            if item.endswith(ext):
                loc = resolve(posixpath.dirname(item) or ".")
                fs = fs or loc.fs
                path = loc.path(posixpath.basename(item))
                files.append(path)
                sizes.setdefault(path, None)
                continue
            loc = resolve(item)
            fs = fs or loc.fs
            info = loc.fs.get_file_info(loc.base)
            if info.type != pafs.FileType.Directory:
                what = "not a directory" if info.type == pafs.FileType.File else "no such directory"
                raise ConfigError(f"data.path={item}: {what} (give a directory of {ext} shards, a brace pattern or a "
                                  "list in data.paths)")
            found = sorted((i for i in loc.fs.get_file_info(pafs.FileSelector(loc.base)) if i.path.endswith(ext)
                            and i.type == pafs.FileType.File), key=lambda i: i.path)
            if not found:
                raise ConfigError(f"data.path={item}: no {ext} shards in it (and no {MANIFEST}): point it at "
                                  "img2dataset's output directory or a prepared dataset")
            listed.append(loc.base)
            for i in found:
                files.append(i.path)
                sizes[i.path] = i.size
    dupes = len(files) - len(set(files))
    if dupes:
        raise ConfigError(f"data.path/data.paths name {dupes} shard(s) twice: each shard once")
    return fs, files, sizes, listed


def _stats_counts(fs: pafs.FileSystem, files: list[str], ext: str = ".tar") -> dict[str, int]:
    """img2dataset's per-shard sample counts (`successes` in <shard>_stats.json), for the shards that have one."""
    stats = {f: f[: -len(ext)] + STATS_SUFFIX for f in files}
    out = {}
    infos = fs.get_file_info(list(stats.values()))
    for f, info in zip(files, infos):
        if info.type != pafs.FileType.File:
            continue
        try:
            with fs.open_input_stream(stats[f]) as s:
                out[f] = int(json.loads(s.read())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable stats: count another way
    return out


def count_samples(fs: pafs.FileSystem, path: str, image_keys: list[str]) -> int:
    """Samples with an image in one tar, from its member names (a local tar is read header by header); rows of a
    Parquet file, from its footer."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            return pq.read_metadata(f).num_rows
    keys = set()
    with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for m in tar.getmembers():
            match = _KEY.match(m.name)
            if m.isreg() and match and match.group(2).lower() in image_keys:
                keys.add(match.group(1))
    return len(keys)


def shard_manifest(d: DataConfig, say=print) -> Manifest:
    """An in-memory manifest of foreign shards: the listing, the sample count and where it came from (said on the
    console), a fingerprint of the shard names and listed sizes (contents are not read)."""
    ext = EXT[d.source]
    fs, files, sizes, listed = list_shards(specs(d), ext)
    stats = _stats_counts(fs, files, ext) if files else {}
    prefix = _prefix(specs(d))
    name = lambda f: prefix + f  # noqa: E731
    if stats and len(stats) == len(files):
        rows, source = stats, f"img2dataset's {STATS_SUFFIX} files"
    elif d.num_samples is not None:
        rows, source = {}, "data.num_samples"
    else:
        say(f"counting the samples of {len(files)} shard(s) (no {STATS_SUFFIX} beside every tar and no "
            "data.num_samples): this reads every shard's tar headers (Parquet: footers); set data.num_samples "
            "to skip it")
        rows, source = {}, "a count of the shards' members"
        for f in files:
            try:
                rows[f] = count_samples(fs, f, d.image_keys)
            except (OSError, tarfile.TarError, EOFError, ValueError) as e:  # ArrowInvalid is a ValueError
                if d.bad_shards != "skip":
                    raise ConfigError(f"shard {name(f)} cannot be read ({e}): restore it, or set "
                                      "data.bad_shards=skip to train without it") from None
                rows[f] = 0
    total = d.num_samples if source == "data.num_samples" else sum(rows.values())
    kind = "WebDataset" if d.source == "webdataset" else "Parquet"
    say(f"data: {len(files)} {kind} shard(s), {total} samples (from {source})")
    base = posixpath.commonpath([posixpath.dirname(f) for f in files]) if len(files) > 1 else posixpath.dirname(files[0])
    display = specs(d)[0] if len(specs(d)) == 1 else ", ".join(specs(d))
    loc = Location(fs, base, display)
    entries = [{"file": posixpath.relpath(f, base) if base else f, "rows": rows.get(f), "bytes": sizes.get(f)}
               for f in files]
    fingerprint = hashlib.sha256("\n".join(f"{e['file']}\t{e['bytes']}" for e in entries).encode()).hexdigest()
    data = {
        "format": FORMAT, "source": d.source, "shard_format": d.source, "foreign": True,
        "counts": {"train": total}, "count_source": source, "splits": {"train": entries}, "classes": {},
        "vocab": [], "fingerprint": fingerprint, "fingerprint_of": "shard names and listed sizes (not contents)",
        "keys": {"image": list(d.image_keys), "caption": d.caption_key}, "name_prefix": prefix,
    }
    if d.source == "parquet":
        data["keys"] = dict(zip(("image", "caption"), parquet_columns(fs, files[0], d, prefix)))
    return Manifest(Path(base), data, loc)


def resample(manifest: Manifest, num_samples: int | None, seed: int) -> list[str]:
    """Shards drawn with replacement, as many as cover `num_samples` samples (default: the corpus's count) at the
    corpus's mean samples per shard; each draw is uniform over the shards (OpenCLIP's resampled sampler)."""
    import math

    import numpy as np

    files = manifest.files("train")
    total = manifest.count("train")
    per_shard = max(1.0, total / len(files))
    draws = max(1, math.ceil((num_samples or total) / per_shard))
    rng = np.random.default_rng(seed)
    return [files[i] for i in rng.integers(0, len(files), size=draws)]


def read_train(manifest: Manifest, d: DataConfig, seed: int = 0):
    """The foreign shards as a lazy Ray Dataset of raw rows {image, caption, label, problem}: one shard per input
    row, read by Ray Data's tasks."""
    import ray.data

    files = manifest.files("train")
    fs = manifest.loc.fs
    items = [{"shard": f} for f in (resample(manifest, d.num_samples, seed) if d.resampled else files)]
    keys = manifest.data["keys"]
    reader = ShardReader(fs, manifest.shard_format, keys["image"], keys["caption"], d.bad_shards,
                         manifest.data.get("name_prefix", ""))
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1024))).flat_map(reader)


class ShardReader:
    """Expands one shard row into its samples (a picklable callable: the filesystem travels with it)."""

    def __init__(self, fs: pafs.FileSystem, fmt: str, image, caption: str, bad_shards: str, prefix: str = ""):
        self.fs, self.fmt, self.image, self.caption, self.bad_shards = fs, fmt, image, caption, bad_shards
        self.prefix = prefix

    def __call__(self, row: dict) -> Iterator[dict]:
        read = read_parquet_shard if self.fmt == "parquet" else read_shard
        return read(self.fs, row["shard"], self.image, self.caption, self.bad_shards, self.prefix)


def read_shard(fs: pafs.FileSystem, path: str, image_keys: list[str], caption_key: str,
               bad_shards: str = "error", prefix: str = "") -> Iterator[dict]:
    """The samples of one shard as rows {image: bytes, caption: str, label: -1, problem: str}; `problem` is empty
    for a usable sample, else why it is not (its image is then empty). A shard that cannot be read raises ShardError
    naming it, or with bad_shards=skip ends with one row whose problem says so."""
    sample: dict = {}
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                match = _KEY.match(member.name) if member.isreg() else None
                if match is None:
                    continue
                key, suffix = match.group(1), match.group(2).lower()
                if sample and sample["__key__"] != key:
                    yield sample_row(sample, image_keys, caption_key)
                    sample = {}
                sample["__key__"] = key
                sample[suffix] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        problem = f"shard {prefix}{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if bad_shards != "skip":
            raise ShardError(f"{problem}: restore it, or set data.bad_shards=skip to train without it") from None
        yield {"image": b"", "caption": "", "label": -1, "problem": problem}
        return
    if sample:
        yield sample_row(sample, image_keys, caption_key)


def parquet_columns(fs: pafs.FileSystem, path: str, d: DataConfig, prefix: str = "") -> tuple[str, str]:
    """(image column, caption column) of foreign Parquet: the recipe's, else the first known name in the first
    shard's schema (its footer; no row is read)."""
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            names = pq.read_schema(f).names
    except (OSError, ValueError) as e:
        raise ConfigError(f"shard {prefix}{path} cannot be read ({e}): restore it, or list the shards without it") \
            from None
    chosen = []
    for key, given, known in (("image", d.image_column, IMAGE_COLUMNS),
                              ("caption", d.caption_column, CAPTION_COLUMNS)):
        column = given or next((c for c in known if c in names), None)
        if column not in names:
            what = f"no column {given!r}" if given else f"none of {', '.join(known)}"
            raise ConfigError(f"data.{key}_column: {what} in {prefix}{path} (columns: {', '.join(names)}): set "
                              f"data.{key}_column")
        chosen.append(column)
    return chosen[0], chosen[1]


def read_parquet_shard(fs: pafs.FileSystem, path: str, image_column: str, caption_column: str,
                       bad_shards: str = "error", prefix: str = "") -> Iterator[dict]:
    """The rows of one image-bytes Parquet shard, as read_shard's: the image a binary column or a struct with a
    `bytes` field (Hugging Face datasets' Image feature), the caption a string column."""
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=[image_column, caption_column]):
                for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    if isinstance(image, dict):
                        image = image.get("bytes")
                    caption = str(caption or "").strip()
                    problem = "no image" if not image else "no caption" if not caption else ""
                    yield {"image": b"" if problem else bytes(image), "caption": caption, "label": -1,
                           "problem": problem}
    except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = str(e).splitlines()[0] if str(e) else ""
        problem = f"shard {prefix}{path} cannot be read ({type(e).__name__}: {first})"
        if bad_shards != "skip":
            raise ShardError(f"{problem}: restore it, or set data.bad_shards=skip to train without it") from None
        yield {"image": b"", "caption": "", "label": -1, "problem": problem}


def sample_row(sample: dict, image_keys: list[str], caption_key: str) -> dict:
    """One grouped sample ({"__key__", suffix: bytes}) as a row, or a row with the problem that makes it unusable."""
    image = next((sample[k] for k in image_keys if sample.get(k)), b"")
    caption = ""
    if caption_key in sample:
        caption = sample[caption_key].decode("utf-8", errors="replace").strip()
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
            caption = str(meta.get("caption") or "").strip() if isinstance(meta, dict) else ""
        except ValueError:
            caption = ""
    problem = "no image" if not image else "no caption" if not caption else ""
    return {"image": image if not problem else b"", "caption": caption, "label": -1, "problem": problem}


def _prefix(named: list[str]) -> str:
    """What turns a path inside the filesystem back into the URI a user wrote ("s3://"; "" for local paths)."""
    return f"{urlsplit(named[0]).scheme}://" if named and is_uri(named[0]) else ""
