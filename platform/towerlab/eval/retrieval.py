"""Image <-> text retrieval: recall@K in both directions, computed over chunks of queries so memory stays
O(chunk x N). Several items may share a caption (digits repeat their templates), so a retrieved item counts as a hit
when its caption equals the query's (`groups`: one id per distinct caption). Metric names spell recall@K as
recall_at_K: MLflow refuses '@' in metric names.
"""

from __future__ import annotations

import torch


def _recall(queries: torch.Tensor, keys: torch.Tensor, q_groups: torch.Tensor, k_groups: torch.Tensor,
            ks: tuple[int, ...], chunk: int) -> dict[int, float]:
    hits = {k: 0 for k in ks}
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ keys.T
        top = sims.topk(min(max(ks), keys.shape[0]), dim=1).indices
        match = k_groups[top] == q_groups[start : start + chunk, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {k: hits[k] / queries.shape[0] for k in ks}


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, groups: torch.Tensor,
                ks: tuple[int, ...] = (1, 5), chunk: int = 1024) -> dict[str, float]:
    """Row i of both feature matrices is a pair; groups[i] identifies its caption."""
    out = {}
    for k, v in _recall(image_features, text_features, groups, groups, ks, chunk).items():
        out[f"recall_at_{k}_i2t"] = v
    for k, v in _recall(text_features, image_features, groups, groups, ks, chunk).items():
        out[f"recall_at_{k}_t2i"] = v
    return out
