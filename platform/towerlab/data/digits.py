"""The built-in dataset: scikit-learn's 1,797 handwritten digits (8x8, shipped inside scikit-learn) as
image-caption pairs.

Each image gets one caption drawn from several templates of its class ("a handwritten seven", "the digit 7 written
by hand", ...). A stratified 20% held-out split is never seen by training; zero-shot evaluation embeds one prompt per
template and class and averages them (CLIP's prompt ensembling).
"""

from __future__ import annotations

import numpy as np

from towerlab.data.images import png_bytes

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [
    "a handwritten {name}",
    "the digit {digit} written by hand",
    "a scan of the number {name}",
    "a small blurry {name}",
    "handwriting of the digit {digit}",
    "the number {digit}",
]
PROMPTS = ["a handwritten {name}", "the digit {digit} written by hand", "the number {digit}"]


def fill(template: str, label: int) -> str:
    return template.format(name=NAMES[label], digit=label)


def records(seed: int = 0, heldout_fraction: float = 0.2) -> dict[str, list[dict]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255)
    split: dict[str, list[dict]] = {"train": [], "heldout": []}
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        n_held = int(round(len(idx) * heldout_fraction))
        for k, i in enumerate(idx):
            caption = fill(CAPTIONS[rng.integers(len(CAPTIONS))], label)
            rec = {"id": int(i), "image": png_bytes(pixels[i].astype(np.uint8)), "caption": caption, "label": label}
            split["heldout" if k < n_held else "train"].append(rec)
    return split


def classes() -> dict:
    return {"names": NAMES, "prompts": [[fill(t, c) for t in PROMPTS] for c in range(10)]}
