"""The per-run geometry plot (a PNG logged as an MLflow artifact at the end of training): the geometry metrics over
training steps, and the final image and text embeddings projected on their two principal components, where the
modality gap shows as two separated clouds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from towerlab.util import atomic_path

PANELS = (("modality_gap", "modality gap"), ("alignment", "alignment"), ("uniformity", "uniformity"),
          ("effective_rank", "effective rank"), ("logit_scale", "logit scale"))


def geometry_plot(history: Mapping[str, Sequence[tuple[int, float]]], image: torch.Tensor | None,
                  text: torch.Tensor | None, path: str | os.PathLike, title: str = "") -> Path:
    """history: metric name (e.g. 'uniformity_image') -> [(step, value)]. Written to a temporary name, then
    renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (prefix, label) in zip(axes.flat, PANELS):
        for name in sorted(k for k in history if k == prefix or k.startswith(prefix + "_")):
            points = sorted(history[name])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker=".",
                        label=name[len(prefix) + 1:] or None)
        ax.set_title(label)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0] and any(k != prefix for k in history if k.startswith(prefix)):
            ax.legend(fontsize=8)
    ax = axes.flat[-1]
    if image is not None and text is not None:
        both = torch.cat([image, text]).double()
        centred = both - both.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ v[:2].T).numpy()
        n = image.shape[0]
        ax.scatter(xy[:n, 0], xy[:n, 1], s=4, alpha=0.5, label="image")
        ax.scatter(xy[n:, 0], xy[n:, 1], s=4, alpha=0.5, label="text")
        ax.legend(fontsize=8)
    ax.set_title("final embeddings, 2 principal components")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out
