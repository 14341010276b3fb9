"""Shared fixtures. The Ray and MLflow fixtures start real processes on 127.0.0.1 once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from towerlab.data import prepare

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare("digits", out, shards=4)
    return out


def write_image_folder(root: Path, n: int = 40, size: int = 12, seed: int = 0) -> dict:
    """A real image folder: n images (odd ids PNG, even ids JPEG) of 4 classes (a coloured block in one quadrant on
    noise), a CSV with two caption columns and a label, and a JSONL with a list of captions per image. Returns what
    was written, for tests to check shards against."""
    import json

    import numpy as np
    from PIL import Image

    names = ["red", "green", "blue", "white"]
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        label = i % 4
        px = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
        q = slice(0, size // 2) if label % 2 == 0 else slice(size // 2, size)
        if label < 3:
            px[q, q, label] = 255
        else:
            px[q, q, :] = 255
        name = f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(px).save(root / "images" / name, quality=95)
        caps = [f"a {names[label]} block", f"a picture with a {names[label]} square number {i}"]
        records.append({"image": name, "captions": caps, "label": names[label]})
    with open(root / "captions.csv", "w") as f:
        f.write("image,caption,caption_2,label\n")
        for r in records:
            f.write(f"{r['image']},{r['captions'][0]},{r['captions'][1]},{r['label']}\n")
    with open(root / "captions.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return {"root": root, "images": root / "images", "csv": root / "captions.csv", "jsonl": root / "captions.jsonl",
            "records": records}


@pytest.fixture
def image_folder(tmp_path) -> dict:
    return write_image_folder(tmp_path / "src")


@pytest.fixture
def make_image_folder():
    return write_image_folder


def write_img2dataset_shards(root: Path, shards: int = 2, per_shard: int = 6, size: int = 16, seed: int = 0,
                             dirty: bool = True, corrupt_shard: bool = True) -> dict:
    """WebDataset shards in img2dataset's exact output layout (`--output_format webdataset`), written with the
    `webdataset` library's TarWriter (img2dataset itself does not install here: it needs OpenCV, albumentations,
    wandb and pandas < 3). Per sample `<key>.jpg` (png in odd shards), `<key>.txt` and `<key>.json` (url, key,
    status, caption, sizes, sha256, as img2dataset writes them), keys `<shard:05d><index:04d>`; beside each tar
    `<shard>_stats.json` (with `successes`) and `<shard>.parquet`. With `dirty`, shard 0 also holds a corrupt image
    (undecodable bytes under .jpg) and a sample without a caption (no .txt, no caption in its json), and the last
    shard's samples have their caption only in the json; with `corrupt_shard`, one more tar is unreadable (a
    truncated copy of shard 0) with its stats file. Returns what was written."""
    import hashlib
    import io
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image

    colours = ["red", "green", "blue", "white"]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {"root": root, "tars": [], "good": 0, "corrupt_image": None, "no_caption": None, "bad_tar": None}
    for s in range(shards):
        name = f"{s:05d}"
        fmt = "png" if s % 2 else "jpg"
        rows = []
        with wds.TarWriter(str(root / f"{name}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                label = int(rng.integers(0, 4))
                px = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
                px[: size // 2, : size // 2, min(label, 2)] = 255
                buf = io.BytesIO()
                Image.fromarray(px).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
                image = buf.getvalue()
                caption = f"a {colours[label]} square in the corner, photo {key}"
                meta = {"url": f"http://127.0.0.1/img/{key}.{fmt}", "key": key, "status": "success",
                        "error_message": None, "width": size, "height": size, "original_width": size,
                        "original_height": size, "exif": "{}", "sha256": hashlib.sha256(image).hexdigest(),
                        "caption": caption}
                sample = {"__key__": key, fmt: image, "json": json.dumps(meta).encode()}
                json_only = dirty and s == shards - 1 and shards > 1
                if not json_only:
                    sample["txt"] = caption.encode()
                if dirty and s == 0 and i == 1:
                    sample[fmt] = b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(64)
                    written["corrupt_image"] = key
                elif dirty and s == 0 and i == 2:
                    sample.pop("txt")
                    meta["caption"] = None
                    sample["json"] = json.dumps(meta).encode()
                    written["no_caption"] = key
                else:
                    written["good"] += 1
                sink.write(sample)
                rows.append({"url": meta["url"], "key": key, "status": "success", "caption": meta["caption"]})
        pq.write_table(pa.Table.from_pylist(rows), root / f"{name}.parquet")
        (root / f"{name}_stats.json").write_text(json.dumps(
            {"count": per_shard, "successes": per_shard, "failed_to_download": 0, "failed_to_resize": 0,
             "duration": 0.1, "status_dict": {"success": per_shard}}))
        written["tars"].append(root / f"{name}.tar")
    if corrupt_shard:
        name = f"{shards:05d}"
        whole = (root / "00000.tar").read_bytes()
        (root / f"{name}.tar").write_bytes(whole[: len(whole) // 2 + 100])  # a truncated download
        (root / f"{name}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        written["bad_tar"] = root / f"{name}.tar"
        written["tars"].append(root / f"{name}.tar")
    return written


@pytest.fixture
def make_wds_shards():
    return write_img2dataset_shards
