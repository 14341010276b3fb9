"""Reading a captions file (CSV or JSONL) into entries: image path, captions, optional label, source line.

CSV: a header with an `image` column and a `caption` column (or several: caption, caption_2, ... any column whose
name starts with "caption"); an optional `label` column. A row per caption also works: rows naming the same image
are merged into one record with several captions.
JSONL: one object per line, {"image": "a.jpg", "caption": "..."} or {"image": ..., "captions": ["...", "..."]},
optional "label". Lines naming the same image are merged the same way.

The file must be UTF-8 (a byte-order mark, as Excel's "CSV UTF-8" writes, is fine); a CSV may use ';' or tabs
instead of commas. A file that cannot be parsed at all (no image column, bad JSON, another encoding, a quote that
never closes) is a ConfigError naming the file and line; per-record problems (empty caption, missing image, a path
leading outside the image folder) are left to validation, which counts them.
"""

from __future__ import annotations

import codecs
import csv
import io
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


def _text(path: Path) -> str:
    """The whole file as text: UTF-8, with or without the byte-order mark Excel writes ("CSV UTF-8"). Anything else
    (Latin-1, Windows-1252, UTF-16) is one ConfigError naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(f"{path} line 1: the file is UTF-16 (Excel's 'Unicode Text'): re-save it as UTF-8 (Excel: "
                          "Save As > 'CSV UTF-8')")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}: "
                          f"{e.reason}; Latin-1 or Windows-1252 text?): re-save the file as UTF-8 (Excel: Save As > "
                          "'CSV UTF-8')") from None


def _sniff_delimiter(header: str) -> str:
    """',' unless the header only has an image column when split on ';' or a tab (Excel in locales whose decimal
    separator is a comma writes ';')."""
    for delimiter in (",", ";", "\t"):
        if "image" in next(csv.reader([header], delimiter=delimiter), []):
            return delimiter
    return ","


def _read_csv(path: Path) -> list[tuple]:
    text = _text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_sniff_delimiter(text.partition("\n")[0]),
                        strict=True)  # strict: a quote that never closes is an error, not every later row merged
    # a caption may be long; a field cannot be longer than the file (the default limit is 128 KiB)
    old_limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        rows = []
        while True:
            start = reader.line_num + 1  # the record's first line: where a quote that does not close was opened
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                if "expected after" in str(e) or "unexpected end of data" in str(e):
                    raise ConfigError(f"{path} line {start}: a quoted field that starts on this line is not closed "
                                      f"properly ({e}): end it with a quote followed by the separator or the line "
                                      'end, and write a quote inside a field as ""') from None
                raise ConfigError(f"{path} line {start}: not readable as CSV ({e})") from None
            if row:
                rows.append((start, row))
    finally:
        csv.field_size_limit(old_limit)
    fields = rows[0][1] if rows else []
    cap_cols = [i for i, c in enumerate(fields) if c.strip().lower().startswith("caption")]
    if "image" not in fields or not cap_cols:
        raise ConfigError(f"{path}: the header needs an 'image' column and a 'caption' column (has "
                          f"{', '.join(fields) or 'no header'})")
    image_col = fields.index("image")
    label_col = fields.index("label") if "label" in fields else None
    out = []
    for line, row in rows[1:]:
        if any(f.strip() for f in row[len(fields):]):
            raise ConfigError(f"{path} line {line}: {len(row)} fields but the header has {len(fields)}: put a caption "
                              f"that contains '{reader.dialect.delimiter}' in double quotes")
        image = _image_name(_field(row, image_col))
        if not image:
            raise ConfigError(f"{path} line {line}: empty 'image' field")
        label = clean(_field(row, label_col)) or None
        out.append((image, line, [_field(row, c) for c in cap_cols], label))
    return out


def _field(row: list[str], i: int | None) -> str | None:
    """Column i of a CSV row; None for a column the row is too short to have (as csv.DictReader gives)."""
    return row[i] if i is not None and i < len(row) else None


def _read_jsonl(path: Path) -> list[tuple]:
    out = []
    for line, text in enumerate(io.StringIO(_text(path)), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text.rstrip("\r\n"))  # without the line end: an open string is "Unterminated"
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {line}: not JSON ({e.msg.removesuffix(' at')} at column {e.colno}): one "
                              "object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not _image_name(obj["image"]):
            raise ConfigError(f"{path} line {line}: expected an object with an 'image' key naming a file")
        captions = obj.get("captions", obj.get("caption", []))
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, (str, int, float, type(None))) for c in captions):
            raise ConfigError(f"{path} line {line}: 'captions' must be a string or a list of strings")
        label = clean(obj["label"]) or None if obj.get("label") is not None else None
        out.append((_image_name(obj["image"]), line, captions, label))
    return out


def _image_name(text: str | None) -> str:
    """An image path as written, less surrounding whitespace (inner spaces are part of a file name)."""
    return text.strip() if text else ""
