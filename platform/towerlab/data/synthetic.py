"""A synthetic image-caption source for fast tests: each class is a coloured bar at a class-specific position on
noise, captioned "a <colour> bar at the <place>". Learnable in a few steps, any size, no files needed.

With `signal_dim`, every record also carries a third modality, "signal": its class's fixed random prototype vector
plus noise (the source `synthetic3`), so 3-modality losses (symile, gram) train end to end on three towers.
"""

from __future__ import annotations

import numpy as np

from towerlab.data.images import png_bytes

COLOURS = ["red", "green", "blue", "white"]
PLACES = ["top", "bottom"]
NAMES = [f"{c} {p}" for c in COLOURS for p in PLACES]
TEMPLATES = ["a {colour} bar at the {place}", "an image with a {colour} stripe on the {place}"]


def _caption(template: str, label: int) -> str:
    colour, place = NAMES[label].split()
    return template.format(colour=colour, place=place)


def _image(label: int, rng: np.random.Generator, size: int = 8) -> bytes:
    img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
    colour, place = NAMES[label].split()
    rows = slice(0, size // 2) if place == "top" else slice(size // 2, size)
    channel = COLOURS.index(colour)
    if channel < 3:
        img[rows, :, channel] = 255
    else:
        img[rows, :, :] = 255
    return png_bytes(img)


SIGNAL_NOISE = 0.5  # per element, against prototypes of unit-variance elements: classes overlap a little


def prototypes(signal_dim: int) -> np.ndarray:
    """One fixed vector per class (the same for every seed: the classes are the same)."""
    return np.random.default_rng(7).standard_normal((len(NAMES), signal_dim)).astype(np.float32)


def records(seed: int = 0, size: int = 2048, heldout_fraction: float = 0.2,
            signal_dim: int = 0) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    protos = prototypes(signal_dim) if signal_dim else None
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    n_held = int(size * heldout_fraction)
    for i in range(size):
        label = int(rng.integers(len(NAMES)))
        caption = _caption(TEMPLATES[rng.integers(len(TEMPLATES))], label)
        rec = {"id": i, "image": _image(label, rng), "caption": caption, "label": label}
        if protos is not None:
            noise = SIGNAL_NOISE * rng.standard_normal(signal_dim).astype(np.float32)
            rec["signal"] = (protos[label] + noise).tolist()
        out["heldout" if i < n_held else "train"].append(rec)
    return out


def classes() -> dict:
    return {"names": NAMES, "prompts": [[_caption(t, c) for t in TEMPLATES] for c in range(len(NAMES))]}

