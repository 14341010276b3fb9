"""Zero-shot classification: each class is the normalised mean of its prompt embeddings (CLIP's prompt
ensembling); an image's prediction is the class with the highest cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_embeddings(prompt_features: torch.Tensor, prompts_per_class: int) -> torch.Tensor:
    """[classes * prompts, d] normalised prompt features (class-major) -> [classes, d] class embeddings."""
    per_class = prompt_features.view(-1, prompts_per_class, prompt_features.shape[-1]).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def topk_accuracy(image_features: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    logits = image_features @ classes.T
    ranked = logits.topk(min(max(ks), classes.shape[0]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"zeroshot_top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}
