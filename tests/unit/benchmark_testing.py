"""Benchmark layouts written on disk the way their tools write them, the eval preprocessing spelled out, and the
one-line ConfigError check: shared by tests/unit/eval's benchmark and linear-probe tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from towerlab.config import ConfigError

# words of the digits vocabulary (the test model's tokenizer): unknown words would all be <unk>, making classes tie
CLASSES = ["handwritten_nine", "four", "three", "five", "small_six", "seven"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero", "blurry", "small", "scan"]


def noise_image(rng, size=16) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def reference_pixels(path_or_bytes, recipe) -> np.ndarray:
    """The eval preprocessing, spelled out: RGB, bilinear resize to the model's size, the model's mean/std, CHW."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    img = Image.open(src).convert("RGB").resize((recipe.model.vision.image_size,) * 2, Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(recipe.model.vision.mean, dtype=np.float32)) \
        / np.asarray(recipe.model.vision.std, dtype=np.float32)
    return x.transpose(2, 0, 1)


def write_imagefolder(root, rng, per_class=3):
    files, labels = [], []
    for label, c in enumerate(sorted(CLASSES)):  # ImageFolder's class index: sorted folder names
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            fmt = "PNG" if i % 2 else "JPEG"
            path = root / c / f"img{i}.{fmt.lower().replace('jpeg', 'jpg')}"
            noise_image(rng).save(path, format=fmt)
            files.append(path)
            labels.append(label)
    return files, np.array(labels)


def write_clip_benchmark(root, rng, labels, fmt="webp", shards=2):
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(c.replace("_", " ") for c in CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    per = -(-len(labels) // shards)
    images = []
    for s in range(shards):
        with wds.TarWriter(str(root / "test" / f"{s}.tar")) as w:
            for i in range(s * per, min(len(labels), (s + 1) * per)):
                data = encoded(noise_image(rng), fmt.upper())
                images.append(data)
                w.write({"__key__": f"s{i:07d}", fmt: data, "cls": int(labels[i])})
    return images


def one_line_error(build, evals, *patterns):
    with pytest.raises(ConfigError) as e:
        build(evals)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
