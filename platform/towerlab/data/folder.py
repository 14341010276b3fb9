"""`towerlab data prepare images`: a folder of images plus a captions file -> verified, resumable shards.

Steps:
1. Read the captions file (data/captions.py) and validate every record: the image exists, decodes (PIL loads all
   of it), and has at least one non-empty caption. Problems are counted by kind and reported with examples; with
   strict=True the first problems are a ConfigError instead.
2. Report duplicates: records whose image bytes hash alike (sha256), captions shared by several records. They are
   kept (a duplicate is the user's call), and duplicate images always land in the same split.
3. Split: the held-out fraction is taken from records ordered by image hash, so the split does not depend on the
   captions file's order and never separates identical images.
4. Write fixed-size shards (parquet or webdataset tars) one by one, each atomically (data/formats.py). After every
   shard, a state file records its sha256; an interrupted run, started again with the same inputs, keeps every shard
   whose bytes still match and writes only the rest. The manifest (counts, per-shard sha256 and bytes, the source
   fingerprint, the validation report) is written last, atomically: until it exists nothing can train on the
   directory. If the inputs changed (another source fingerprint), the old manifest is removed first and every
   shard is rewritten. --out must be new, empty, or a towerlab dataset (data/shards.py's claim_target): only the
   files towerlab wrote there are ever replaced or removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from towerlab.config.errors import ConfigError
from towerlab.data.captions import Entry, read_captions
from towerlab.data.formats import EXTENSION, FORMATS, write_shard
from towerlab.data.shards import FORMAT, MANIFEST, STATE, Manifest, claim_target, remove_owned, sha256_file, write_json
from towerlab.data.tokenizer import build_vocab

PROBLEMS = ("missing file", "undecodable image", "empty caption", "outside --images")
EXAMPLES = 5


@dataclass
class Report:
    records: int = 0  # entries in the captions file (after merging rows naming the same image)
    valid: int = 0
    problems: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PROBLEMS})
    examples: list[str] = field(default_factory=list)  # the first few problems, each naming file and line
    duplicate_images: int = 0  # records whose image bytes equal an earlier record's
    duplicate_image_examples: list[list[str]] = field(default_factory=list)
    duplicate_captions: int = 0  # distinct captions used by more than one record
    duplicate_caption_examples: list[str] = field(default_factory=list)
    multi_caption_records: int = 0
    max_captions: int = 0
    shards_written: int = 0
    shards_reused: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _validate(entries: list[Entry], images: Path, captions_file: Path, report: Report) -> list[dict]:
    """Records that pass, with their bytes and hash; problems counted in `report`."""
    good = []
    root = images.resolve()
    for e in entries:
        problem = None
        data = b""
        try:
            # resolved, so '../x', an absolute path or a symlink cannot pull in a file from outside --images
            path = (images / e.image).resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
            path = None
        if path is not None and not path.is_relative_to(root):
            problem = "outside --images"
        elif path is None or not path.is_file():
            problem = "missing file"
        else:
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
                problem = "undecodable image"
        if problem is None and not e.captions:
            problem = "empty caption"
        if problem:
            report.problems[problem] += 1
            if len(report.examples) < EXAMPLES:
                report.examples.append(f"{captions_file.name} line {e.line}: {problem} ({e.image})")
            continue
        # the bytes are read again when their shard is written: holding every image would not fit for big folders
        good.append({"entry": e, "path": path, "sha256": hashlib.sha256(data).hexdigest()})
    report.records, report.valid = len(entries), len(good)
    return good


def _duplicates(good: list[dict], report: Report) -> None:
    by_hash: dict[str, list[str]] = defaultdict(list)
    for g in good:
        by_hash[g["sha256"]].append(g["entry"].image)
    groups = [names for names in by_hash.values() if len(names) > 1]
    report.duplicate_images = sum(len(names) - 1 for names in groups)
    report.duplicate_image_examples = groups[:EXAMPLES]
    uses = Counter(c for g in good for c in set(g["entry"].captions))
    shared = sorted((c for c, n in uses.items() if n > 1), key=lambda c: (-uses[c], c))
    report.duplicate_captions = len(shared)
    report.duplicate_caption_examples = shared[:EXAMPLES]
    ncap = [len(g["entry"].captions) for g in good]
    report.multi_caption_records = sum(n > 1 for n in ncap)
    report.max_captions = max(ncap, default=0)


def _split(good: list[dict], heldout: float) -> dict[str, list[dict]]:
    """Held-out records by image hash order (whole groups of identical images); both splits keep file order."""
    target = round(len(good) * heldout)
    per_hash = Counter(g["sha256"] for g in good)
    chosen: set[str] = set()
    taken = 0
    for h in sorted(per_hash):
        if taken >= target:
            break
        chosen.add(h)
        taken += per_hash[h]
    return {"train": [g for g in good if g["sha256"] not in chosen],
            "heldout": [g for g in good if g["sha256"] in chosen]}


def _classes(good: list[dict], prompt: str) -> tuple[dict, dict[str, int]]:
    names = sorted({g["entry"].label for g in good if g["entry"].label is not None})
    if not names:
        return {"names": [], "prompts": []}, {}
    return {"names": names, "prompts": [[prompt.format(n)] for n in names]}, {n: i for i, n in enumerate(names)}


def _fingerprint(captions_file: Path, good: list[dict], settings: dict) -> str:
    h = hashlib.sha256(captions_file.read_bytes())
    for g in good:
        h.update(g["sha256"].encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _row(rec: dict, label_ids: dict[str, int]) -> dict:
    e: Entry = rec["entry"]
    data = rec["path"].read_bytes()
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise ConfigError(f"{rec['path']} changed while the dataset was being prepared: run the command again")
    return {"id": e.line, "image": data, "caption": e.captions[0], "captions": e.captions,
            "label": label_ids.get(e.label, -1)}


def _known_shards(out: Path, fingerprint: str) -> dict[str, dict]:
    """Shards a previous run of the same inputs finished: from its state file, or from its manifest."""
    for name in (STATE, MANIFEST):
        p = out / name
        if not p.is_file():
            continue
        try:
            prev = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if prev.get("source_fingerprint") != fingerprint:
            continue
        if name == STATE:
            return prev["shards"]
        return {e["file"]: e for entries in prev["splits"].values() for e in entries}
    return {}


def prepare_images(images: str | os.PathLike, captions: str | os.PathLike, out: str | os.PathLike,
                   fmt: str = "parquet", shard_size: int = 1000, strict: bool = False, heldout: float = 0.1,
                   prompt: str = "a photo of a {}.",
                   on_shard: Callable[[str, bool], None] | None = None) -> tuple[Manifest, Report]:
    """Validate, report and shard an image folder with captions; resumable (see the module docstring).
    `on_shard(file, reused)` is called after each shard (progress display)."""
    images, captions, out = Path(images), Path(captions), Path(out).absolute()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be at least 1")
    if not 0 <= heldout < 1:
        raise ConfigError(f"--heldout {heldout}: a fraction in [0, 1)")
    if not images.is_dir():
        raise ConfigError(f"--images {images}: no such directory")
    if "{}" not in prompt:
        raise ConfigError(f"--prompt {prompt!r}: needs {{}} where the class name goes")

    report = Report()
    good = _validate(read_captions(captions), images, captions, report)
    bad = sum(report.problems.values())
    if strict and bad:
        raise ConfigError(f"{bad} bad record(s) in {captions} (--strict): {'; '.join(report.examples[:3])}"
                          + (" ..." if bad > 3 else "") + ": fix them, or drop --strict to skip and count them")
    if not good:
        raise ConfigError(f"no usable record in {captions} ({', '.join(f'{k}: {v}' for k, v in report.problems.items())}"
                          f"): check --images {images}")
    _duplicates(good, report)
    splits = _split(good, heldout)
    classes, label_ids = _classes(good, prompt)
    settings = {"format": fmt, "shard_size": shard_size, "heldout": heldout, "prompt": prompt}
    fingerprint = _fingerprint(captions, good, settings)

    ext = EXTENSION[fmt]
    planned = {f"{split}/part-{k // shard_size:05d}.{ext}" for split, recs in splits.items()
               for k in range(0, len(recs), shard_size)}
    # a directory that is neither empty nor towerlab's is refused before anything is written; in one that is,
    # only the files towerlab wrote there are replaced or removed
    owned = claim_target(out, planned | {MANIFEST, STATE}, "--out")
    out.mkdir(parents=True, exist_ok=True)
    known = _known_shards(out, fingerprint)
    # written before the old manifest goes: an interrupted run leaves the directory recognisably towerlab's, and
    # remembers which files of the old dataset it may still remove
    state = {"format": FORMAT, "source_fingerprint": fingerprint, "owned": sorted(owned | planned),
             "shards": dict(known)}
    write_json(out / STATE, state)
    if (out / MANIFEST).exists() and not known:
        (out / MANIFEST).unlink()  # other inputs: the old dataset stops being trainable before any shard changes
    entries: dict[str, list[dict]] = {}
    for split, recs in splits.items():
        if recs:
            (out / split).mkdir(exist_ok=True)
        entries[split] = []
        for k in range(0, len(recs), shard_size):
            rel = f"{split}/part-{k // shard_size:05d}.{ext}"
            part = recs[k:k + shard_size]
            prev = known.get(rel)
            reused = (prev is not None and prev.get("rows") == len(part) and (out / rel).is_file()
                      and sha256_file(out / rel) == prev["sha256"])
            if not reused:
                write_shard([_row(r, label_ids) for r in part], out / rel, fmt)
            entry = {"file": rel, "rows": len(part), "sha256": prev["sha256"] if reused else sha256_file(out / rel),
                     "bytes": (out / rel).stat().st_size}
            entries[split].append(entry)
            state["shards"][rel] = entry
            write_json(out / STATE, state)
            report.shards_reused += reused
            report.shards_written += not reused
            if on_shard:
                on_shard(rel, reused)
    remove_owned(out, owned - planned - {MANIFEST, STATE})  # shards of an earlier plan; never a user's files

    vocab_text = [c for g in splits["train"] for c in g["entry"].captions]
    vocab_text += [p for ps in classes["prompts"] for p in ps]
    manifest = {
        "format": FORMAT,
        "source": f"images:{images.absolute()}",
        "shard_format": fmt,
        "columns": ["id", "image", "caption", "captions", "label"],
        "counts": {s: len(r) for s, r in splits.items()},
        "splits": entries,
        "classes": classes,
        "vocab": build_vocab(vocab_text),
        "fingerprint": hashlib.sha256("".join(e["sha256"] for s in sorted(entries) for e in entries[s])
                                      .encode()).hexdigest(),
        "source_fingerprint": fingerprint,
        "settings": settings,
        "report": report.as_dict(),
    }
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink()
    return Manifest(out, manifest), report
