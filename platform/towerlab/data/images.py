"""Image encoding, decoding and augmentation (PIL + numpy), shared by shard writing, Ray Data and evaluation.

Decoded images are float32 CHW, normalised as (pixel / 255 - mean) / std per channel: [-1, 1] with towerlab's
default mean = std = 0.5, or an imported model's own statistics (CLIP's, for instance).

Augmentation is a random resized crop (area fraction in [crop_scale_min, 1], aspect ratio in [3/4, 4/3]), an
optional horizontal flip, and an optional colour jitter (brightness, contrast and saturation each scaled by a factor drawn from [1 - s, 1 + s], PIL's ImageEnhance).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance

from towerlab.config.schema import AugmentConfig


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a HxW (grey) or HxWx3 (RGB) uint8 array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _crop_box(w: int, h: int, scale_min: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    area = w * h * rng.uniform(scale_min, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, math.sqrt(area * ratio))
    ch = min(h, math.sqrt(area / ratio))
    left = rng.uniform(0, w - cw)
    top = rng.uniform(0, h - ch)
    return (left, top, left + cw, top + ch)


def colour_jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(max(0.0, 1 - strength), 1 + strength)))
    return img


def decode(data: bytes, size: int, augment: AugmentConfig | None = None, rng: np.random.Generator | None = None,
           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = None
    if augment is not None and augment.random_resized_crop:
        box = _crop_box(img.width, img.height, augment.crop_scale_min, rng or np.random.default_rng())
    img = img.resize((size, size), Image.BILINEAR, box=box)
    if augment is not None and augment.colour_jitter and augment.colour_jitter_strength > 0:
        img = colour_jitter(img, augment.colour_jitter_strength, rng or np.random.default_rng())
    m, sd = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    arr = (np.asarray(img, dtype=np.float32) * (1.0 / 255.0) - m) / sd
    if augment is not None and augment.flip and (rng or np.random.default_rng()).random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
