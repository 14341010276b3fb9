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
(no manifest.json is written or needed) with a `train` split (and `heldout`, the shards data.heldout_shards keeps
out, chosen by seed), so the rest of the pipeline takes one code path.

Mixtures (`data.sources: [{path, weight}]`): every corpus is listed and counted on its own; its shards carry its
index. With data.resampled, each epoch draws shards with replacement from a generator seeded by (seed, epoch), a
shard's probability its corpus's weight over the corpus's samples (`shard_probabilities`), so each corpus's share
of the samples is its weight's share; without it (equal weights only) the corpora are read one after the other.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from towerlab.config.errors import ConfigError
from towerlab.config.schema import DataConfig
from towerlab.config.secrets import redact_uri
from towerlab.data.location import Location, is_uri, resolve
from towerlab.data.shards import FORMAT, MANIFEST, Manifest

# webdataset's rule: the key is everything up to the first dot of the member's base name, the suffix the rest
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
STATS_SUFFIX = "_stats.json"
EXT = {"webdataset": ".tar", "parquet": ".parquet"}
# foreign Parquet columns tried in order when the recipe names none: img2dataset's, then Hugging Face datasets'
IMAGE_COLUMNS = ("jpg", "image", "png", "webp", "jpeg")
CAPTION_COLUMNS = ("caption", "txt", "text")
# the generators of the epochs' draws, (seed, DRAWS, epoch), and of the held-out choice, (seed, HELDOUT): apart
DRAWS, HELDOUT = 0, 1


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


@dataclass(frozen=True)
class Corpus:
    """One corpus of the run: its shard locations, its weight in the mixture and its sample count if the recipe
    gives one."""

    specs: list[str]
    weight: float = 1.0
    num_samples: int | None = None


def corpora(d: DataConfig) -> list[Corpus]:
    """data.sources as corpora, else data.path/data.paths as one corpus of weight 1."""
    if d.sources:
        return [Corpus([s.path], float(s.weight), s.num_samples) for s in d.sources]
    return [Corpus(specs(d), 1.0, d.num_samples)]


def _count(fs: pafs.FileSystem, files: list[str], ext: str, num_samples: int | None, d: DataConfig,
           name, say) -> tuple[dict[str, int], str, int]:
    """(samples per shard where known, where the count came from, the corpus's samples): img2dataset's stats files
    when every shard has one, else the recipe's num_samples, else a count of the shards' members."""
    stats = _stats_counts(fs, files, ext) if files else {}
    if stats and len(stats) == len(files):
        return stats, f"img2dataset's {STATS_SUFFIX} files", sum(stats.values())
    if num_samples is not None:
        return {}, "data.sources[].num_samples" if d.sources else "data.num_samples", num_samples
    key = "data.sources[].num_samples" if d.sources else "data.num_samples"
    say(f"counting the samples of {len(files)} shard(s) (no {STATS_SUFFIX} beside every tar and no {key}): this "
        f"reads every shard's tar headers (Parquet: footers); set {key} to skip it")
    rows = {}
    for f in files:
        try:
            rows[f] = count_samples(fs, f, d.image_keys)
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:  # ArrowInvalid is a ValueError
            if d.bad_shards != "skip":
                raise ConfigError(f"shard {name(f)} cannot be read ({e}): restore it, or set "
                                  "data.bad_shards=skip to train without it") from None
            rows[f] = 0
    return rows, "a count of the shards' members", sum(rows.values())


def _one_filesystem(named: list[str]) -> None:
    schemes = {urlsplit(p).scheme if is_uri(p) else "local" for p in named}
    if len(schemes) > 1:
        raise ConfigError(f"data.sources mix filesystems ({', '.join(sorted(schemes))}): keep one filesystem per run")


def heldout_choice(n: int, fraction: float, seed: int) -> list[int]:
    """Which of n listed shards (by index) data.heldout_shards=fraction keeps out of training: round(fraction * n),
    at least one and never all, chosen by `seed` alone (so a rerun, a resume and a sweep trial hold out the same)."""
    import numpy as np

    k = max(1, round(fraction * n))
    if n - k < 1:
        raise ConfigError(f"data.heldout_shards={fraction}: {n} shard(s) cannot hold {k} out and keep one for "
                          "training: list more shards, or set data.heldout_shards=0 (and evaluate on a prepared "
                          "directory)")
    return sorted(int(i) for i in np.random.default_rng([seed, HELDOUT]).choice(n, size=k, replace=False))


def shard_manifest(d: DataConfig, say=print, seed: int = 0) -> Manifest:
    """An in-memory manifest of foreign shards: the listing of every corpus (data.sources, else data.path/paths),
    each one's sample count and where it came from (said on the console), the held-out shards (data.heldout_shards,
    chosen by `seed`), and a fingerprint of the shard names and listed sizes (contents are not read) and of the
    mixture's weights."""
    ext = EXT[d.source]
    named = [p for c in corpora(d) for p in c.specs]
    _one_filesystem(named)
    prefix = _prefix(named)
    name = lambda f: prefix + f  # noqa: E731
    fs, files, sizes, owner, described = None, [], {}, {}, []
    rows: dict[str, int] = {}
    for i, c in enumerate(corpora(d)):
        cfs, cfiles, csizes, _ = list_shards(c.specs, ext)
        fs = fs or cfs
        crows, source, total = _count(cfs, cfiles, ext, c.num_samples, d, name, say)
        files += cfiles
        sizes.update(csizes)
        rows.update(crows)
        owner.update({f: i for f in cfiles})
        described.append({"path": redact_uri(", ".join(c.specs)), "weight": c.weight, "shards": len(cfiles),
                          "samples": total, "count_source": source})
    if len(files) != len(set(files)):
        raise ConfigError(f"data.sources name {len(files) - len(set(files))} shard(s) in two corpora: each shard "
                          "in one corpus")
    held = set(heldout_choice(len(files), d.heldout_shards, seed)) if d.heldout_shards else set()
    base = posixpath.commonpath([posixpath.dirname(f) for f in files]) if len(files) > 1 else posixpath.dirname(files[0])
    entries: dict[str, list[dict]] = {"train": [], **({"heldout": []} if held else {})}
    for k, f in enumerate(files):
        entries["heldout" if k in held else "train"].append(
            {"file": posixpath.relpath(f, base) if base else f, "rows": rows.get(f), "bytes": sizes.get(f),
             "source": owner[f]})
    for i, c in enumerate(described):  # each corpus's samples per split: summed, or (counts not per shard) pro rata
        for split, es in entries.items():
            mine = [e for e in es if e["source"] == i]
            known = all(e["rows"] is not None for e in mine)
            c[f"{split}_samples"] = (sum(e["rows"] for e in mine) if known else
                                     round(c["samples"] * len(mine) / max(c["shards"], 1)))
        if not any(e["source"] == i for e in entries["train"]):
            raise ConfigError(f"data.heldout_shards={d.heldout_shards} leaves {c['path']} no training shard: lower it, "
                              "or list more shards")
    counts = {split: sum(c[f"{split}_samples"] for c in described) for split in entries}
    for c in described:  # resampled: the weight's share; read once each (equal weights): the corpus's own size
        c["share"] = (c["weight"] / sum(x["weight"] for x in described) if d.resampled else
                      c["train_samples"] / max(counts["train"], 1))
    kind = "WebDataset" if d.source == "webdataset" else "Parquet"
    if d.sources:
        say(f"data: a mixture of {len(described)} {kind} corpora, {len(files)} shard(s), "
            f"{sum(c['samples'] for c in described)} samples")
        for c in described:
            say(f"  {c['path']}: weight {c['weight']:g} ({c['share']:.0%} of the training samples), {c['shards']} "
                f"shard(s), {c['samples']} samples (from {c['count_source']})")
    else:
        c = described[0]
        say(f"data: {len(files)} {kind} shard(s), {c['samples']} samples (from {c['count_source']})")
    if held:
        say(f"data: {len(held)} shard(s) held out (data.heldout_shards={d.heldout_shards}), {counts['heldout']} "
            "samples: the split `heldout`")
    display = named[0] if len(named) == 1 else ", ".join(named)
    loc = Location(fs, base, display)
    lines = [f"{e['file']}\t{e['bytes']}" for e in entries["train"]]
    lines += [f"heldout\t{e['file']}\t{e['bytes']}" for e in entries.get("heldout", [])]
    lines += [f"source\t{i}\t{c['weight']:g}" for i, c in enumerate(described)] if d.sources else []
    fingerprint = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    data = {
        "format": FORMAT, "source": d.source, "shard_format": d.source, "foreign": True,
        "counts": counts, "count_source": "; ".join(dict.fromkeys(c["count_source"] for c in described)),
        "splits": entries, "classes": {}, "sources": described,
        "vocab": [], "fingerprint": fingerprint,
        "fingerprint_of": "shard names and listed sizes (not contents)" + (", weights" if d.sources else ""),
        "keys": {"image": list(d.image_keys), "caption": d.caption_key}, "name_prefix": prefix,
        "bad_shards": str(d.bad_shards),
    }
    if d.source == "parquet":
        data["keys"] = dict(zip(("image", "caption"), parquet_columns(fs, files[0], d, prefix)))
    return Manifest(Path(base), data, loc)


def shard_probabilities(manifest: Manifest) -> "np.ndarray":
    """Each training shard's probability of a draw: its corpus's weight over the corpus's training samples, so a
    corpus's expected share of the drawn samples is its share of the weights whatever its size (OpenCLIP's
    upsampling factors scaled by the corpus sizes), uniform over the shards of one corpus (OpenCLIP's resampler)."""
    import numpy as np

    sources = manifest.data.get("sources") or [{"weight": 1.0, "train_samples": manifest.count("train")}]
    p = np.array([sources[e.get("source", 0)]["weight"] / max(sources[e.get("source", 0)]["train_samples"], 1)
                  for e in manifest.data["splits"]["train"]])
    return p / p.sum()


def expected_rows(manifest: Manifest) -> "np.ndarray":
    """Each training shard's samples: its own count where known, else its corpus's mean per shard."""
    import numpy as np

    entries = manifest.data["splits"]["train"]
    sources = manifest.data.get("sources") or [{"train_samples": manifest.count("train")}]
    shards = np.bincount([e.get("source", 0) for e in entries], minlength=len(sources))
    return np.array([e["rows"] if e["rows"] is not None else
                     sources[e.get("source", 0)]["train_samples"] / shards[e.get("source", 0)] for e in entries],
                    dtype=float)


def resample(manifest: Manifest, num_samples: int | None, seed: int, epoch: int = 0) -> list[str]:
    """Epoch `epoch`'s shards, drawn with replacement (shard_probabilities), as many as cover `num_samples` samples
    (default: the training split's count) in expectation; the generator is seeded by (seed, epoch), so every epoch
    draws anew and a rerun draws the same."""
    import math

    import numpy as np

    files = manifest.files("train")
    p = shard_probabilities(manifest)
    per_draw = max(1.0, float(p @ expected_rows(manifest)))
    draws = max(1, math.ceil((num_samples or manifest.count("train")) / per_draw))
    rng = np.random.default_rng([seed, DRAWS, epoch])
    return [files[i] for i in rng.choice(len(files), size=draws, p=p)]


def epochs_needed(samples: int, epoch_samples: int) -> int:
    """Epochs of draws a run of `samples` training samples reads: one more than they cover, since dirty samples and
    each worker's last partial batch make an epoch yield somewhat fewer."""
    return -(-samples // max(epoch_samples, 1)) + 1


def read_train(manifest: Manifest, d: DataConfig, seed: int = 0, epochs: int = 1):
    """The foreign shards as a lazy Ray Dataset of raw rows {image, caption, label, problem}: one shard per input
    row, read by Ray Data's tasks. Resampled, it holds the draws of `epochs` epochs one after the other (each
    epoch's drawn by `resample`): Ray Train takes one dataset per run, so that is where each epoch's draws go."""
    import ray.data

    fs = manifest.loc.fs
    if d.resampled:
        shards = [f for e in range(epochs) for f in resample(manifest, d.num_samples, seed, e)]
    else:
        shards = manifest.files("train")
    items = [{"shard": f} for f in shards]
    keys = manifest.data["keys"]
    reader = ShardReader(fs, manifest.shard_format, keys["image"], keys["caption"], d.bad_shards,
                         manifest.data.get("name_prefix", ""))
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1024))).flat_map(reader)


def split_rows(manifest: Manifest, split: str, columns: list[str]) -> dict[str, list]:
    """A (small) split of foreign shards as columns, read here (the held-out shards an evaluator reads): dirty
    samples and images that do not decode are left out, as training drops them; an unreadable shard is a
    ShardError naming it, or left out with data.bad_shards=skip."""
    import io

    from PIL import Image

    keys, fmt = manifest.data["keys"], manifest.shard_format
    read = read_parquet_shard if fmt == "parquet" else read_shard
    out: dict[str, list] = {c: [] for c in columns}
    for f in manifest.files(split):
        for row in read(manifest.loc.fs, f, keys["image"], keys["caption"], manifest.data.get("bad_shards", "error"),
                        manifest.data.get("name_prefix", "")):
            if row["problem"]:
                continue
            try:
                with Image.open(io.BytesIO(row["image"])) as im:
                    im.load()
            except Exception:  # noqa: BLE001: PIL raises many types for undecodable bytes
                continue
            for c in columns:
                out[c].append(row.get(c))
    return out


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
