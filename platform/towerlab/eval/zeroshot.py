"""Zero-shot classification: each class is the normalised mean of its prompt embeddings (CLIP's prompt
ensembling); an image's prediction is the class with the highest cosine similarity. Metrics: top{K} accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from towerlab.eval.numbers import as_floats


def class_embeddings(prompt_features: torch.Tensor, prompts_per_class: int) -> torch.Tensor:
    """[classes * prompts, d] normalised prompt features (class-major) -> [classes, d] class embeddings."""
    per_class = prompt_features.view(-1, prompts_per_class, prompt_features.shape[-1]).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def topk_tensors(image_features: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                 ks: tuple[int, ...] = (1, 5), chunk: int = 1024) -> dict[str, torch.Tensor]:
    """topk_accuracy's metrics as 0-d tensors on the features' device."""
    kmax = min(max(ks), classes.shape[0])
    labels = labels.to(image_features.device)
    hits = {k: torch.zeros((), dtype=torch.float64, device=image_features.device) for k in ks}
    for start in range(0, image_features.shape[0], chunk):
        ranked = (image_features[start : start + chunk] @ classes.T).topk(kmax, dim=1).indices
        correct = ranked == labels[start : start + chunk, None]
        for k in ks:
            hits[k] += correct[:, :k].any(dim=1).sum()
    return {f"top{k}": hits[k] / image_features.shape[0] for k in ks}


def topk_accuracy(image_features: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5), chunk: int = 1024) -> dict[str, float]:
    return as_floats(topk_tensors(image_features, classes, labels, ks, chunk))
