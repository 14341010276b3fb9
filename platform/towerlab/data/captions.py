"""Reading a captions file (CSV or JSONL) into entries: image path, captions, optional label, source line.

CSV: a header with an `image` column and a `caption` column (or several: caption, caption_2, ... any column whose
name starts with "caption"); an optional `label` column. A row per caption also works: rows naming the same image
are merged into one record with several captions.
JSONL: one object per line, {"image": "a.jpg", "caption": "..."} or {"image": ..., "captions": ["...", "..."]},
optional "label". Lines naming the same image are merged the same way.

A file that cannot be parsed at all (no image column, bad JSON) is a ConfigError naming the file and line; per-record
problems (empty caption, missing image) are left to validation, which counts them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from towerlab.config.errors import ConfigError


@dataclass
class Entry:
    image: str  # path relative to the images directory
    line: int  # first line of the captions file naming it (1-based, header = line 1 for CSV)
    captions: list[str] = field(default_factory=list)
    label: str | None = None


def clean(text: object) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def read_captions(path: str | Path) -> list[Entry]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--captions {path}: no such file (give a .csv or .jsonl captions file)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw = _read_csv(path)
    elif suffix in (".jsonl", ".json"):
        raw = _read_jsonl(path)
    else:
        raise ConfigError(f"--captions {path}: unknown type '{suffix}' (use .csv or .jsonl)")
    merged: dict[str, Entry] = {}
    for image, line, captions, label in raw:
        e = merged.setdefault(image, Entry(image, line, [], label))
        e.captions.extend(c for c in (clean(c) for c in captions) if c)
        if e.label is None:
            e.label = label
        elif label is not None and label != e.label:
            raise ConfigError(f"{path} line {line}: image '{image}' has label '{label}' here but '{e.label}' at line "
                              f"{e.line}: give each image one label")
    return list(merged.values())


def _read_csv(path: Path) -> list[tuple]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        cap_cols = [c for c in fields if c.strip().lower().startswith("caption")]
        if "image" not in fields or not cap_cols:
            raise ConfigError(f"{path}: the header needs an 'image' column and a 'caption' column (has "
                              f"{', '.join(fields) or 'no header'})")
        out = []
        for row in reader:
            line = reader.line_num
            image = clean(row.get("image"))
            if not image:
                raise ConfigError(f"{path} line {line}: empty 'image' field")
            label = clean(row.get("label")) or None if "label" in fields else None
            out.append((image, line, [row.get(c) for c in cap_cols], label))
    return out


def _read_jsonl(path: Path) -> list[tuple]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {line}: not JSON ({e.msg}): one object per line") from None
            if not isinstance(obj, dict) or not clean(obj.get("image")):
                raise ConfigError(f"{path} line {line}: expected an object with an 'image' key")
            captions = obj.get("captions", obj.get("caption", []))
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list):
                raise ConfigError(f"{path} line {line}: 'captions' must be a string or a list of strings")
            label = clean(obj["label"]) or None if obj.get("label") is not None else None
            out.append((clean(obj["image"]), line, captions, label))
    return out
