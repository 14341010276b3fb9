"""The two shard formats of a prepared dataset, each written and read here and nowhere else.

- parquet: one table per shard, columns id (int64), image (encoded bytes), caption (the first caption), captions
  (list of all captions), label (int64; -1 when unlabelled).
- webdataset: one tar per shard in the layout OpenCLIP and LAION use: for every record `<key>.<png|jpg>` (the
  encoded image, untouched) and `<key>.json` ({"id", "caption", "captions", "label"}). Members are written with
  fixed metadata (mtime 0, uid 0), so the same records always give the same bytes and the same checksum.

Rows are plain dicts with those keys; `wds_row` turns a sample of ray.data.read_webdataset into the same row, so
the training pipeline sees one schema whatever the format.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from towerlab.config.errors import ConfigError

FORMATS = ("parquet", "webdataset")
EXTENSION = {"parquet": "parquet", "webdataset": "tar"}
COLUMNS = ["id", "image", "caption", "captions", "label"]
SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("caption", pa.string()),
                    ("captions", pa.list_(pa.string())), ("label", pa.int64())])
IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


def image_suffix(data: bytes) -> str:
    """The file extension of an encoded image, from its magic bytes (what WebDataset readers key on)."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"GIF8"):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    return "tiff"


def write_shard(rows: list[dict], path: Path, fmt: str) -> None:
    """Write `rows` to `path` atomically: a temporary sibling, fsynced, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        elif fmt == "webdataset":
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for r in rows:
                    key = f"{r['id']:09d}"
                    meta = {"id": r["id"], "caption": r["caption"], "captions": r["captions"], "label": r["label"]}
                    _add(tar, f"{key}.{image_suffix(r['image'])}", r["image"])
                    _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        else:
            raise ConfigError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def wds_row(sample: dict) -> dict:
    """A ray.data.read_webdataset sample ({"__key__", "png"|"jpg"|..., "json"} as bytes) as a towerlab row. Given
    to read_webdataset as its decoder, so the images stay encoded until the preprocessing step."""
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    if image is None or "json" not in sample:
        raise ValueError(f"webdataset sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image or "
                         f"no json member (has {sorted(k for k in sample if not k.startswith('__'))})")
    meta = json.loads(sample["json"])
    return {"id": int(meta["id"]), "image": image, "caption": meta["caption"],
            "captions": json.dumps(meta["captions"]), "label": int(meta["label"])}


def read_table(fs, path: str, fmt: str, columns: list[str]) -> pa.Table:
    """A whole shard as an Arrow table of `columns` (those it has), through the dataset's pyarrow filesystem."""
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            names = pq.read_schema(f).names
            return pq.read_table(f, columns=[c for c in columns if c in names])
    return pa.table(read_rows(fs, path, fmt, columns))


def read_rows(fs, path: str, fmt: str, columns: list[str]) -> dict[str, list]:
    """A whole shard as columns (evaluation splits, tests), through the dataset's pyarrow filesystem."""
    if fmt == "parquet":
        return read_table(fs, path, fmt, columns).to_pydict()
    out: dict[str, list] = {c: [] for c in columns}
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        sample: dict = {}
        for member in tar:
            key, _, suffix = member.name.partition(".")
            if sample and sample["__key__"] != key:
                _append(out, wds_row(sample), columns)
                sample = {}
            sample["__key__"] = key
            sample[suffix] = tar.extractfile(member).read()
        if sample:
            _append(out, wds_row(sample), columns)
    return out


def _append(out: dict[str, list], row: dict, columns: list[str]) -> None:
    for c in columns:
        out[c].append(row[c])
