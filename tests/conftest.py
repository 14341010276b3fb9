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
