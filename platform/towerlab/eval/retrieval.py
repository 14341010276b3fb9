"""Image <-> text retrieval in both directions: recall@K and the median rank of the first correct item, computed
over chunks of queries so memory stays O(chunk x N) and never O(N x N).

Several items may share a caption (digits repeat their templates), so a retrieved item counts as a hit when its
caption equals the query's (`groups`: one id per distinct caption). A query's rank is 1 + the number of keys scored
strictly higher than its best-scoring correct key (ties go to the correct key). Metric names spell recall@K as
recall_at_K: MLflow refuses '@' in metric names.
"""

from __future__ import annotations

import torch

from towerlab.eval.numbers import as_floats


def first_hit_ranks(queries: torch.Tensor, keys: torch.Tensor, q_groups: torch.Tensor, k_groups: torch.Tensor,
                    chunk: int = 1024) -> torch.Tensor:
    """[Q] 1-based rank of each query's best correct key among all keys."""
    ranks = []
    q_groups, k_groups = q_groups.to(queries.device), k_groups.to(queries.device)
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk].float() @ keys.float().T
        correct = k_groups[None, :] == q_groups[start : start + chunk, None]
        best = sims.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append((sims > best).sum(dim=1) + 1)
    return torch.cat(ranks)


def _summary(ranks: torch.Tensor, ks: tuple[int, ...], direction: str) -> dict[str, torch.Tensor]:
    r = ranks.double()
    out = {f"recall_at_{k}_{direction}": (r <= k).double().mean() for k in ks}
    out[f"median_rank_{direction}"] = r.quantile(0.5)  # linear interpolation: numpy's median for even counts
    return out


def recall_tensors(image_features: torch.Tensor, text_features: torch.Tensor, groups: torch.Tensor,
                   ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[str, torch.Tensor]:
    """recall_at_k's metrics as 0-d tensors on the features' device."""
    i2t = first_hit_ranks(image_features, text_features, groups, groups, chunk)
    t2i = first_hit_ranks(text_features, image_features, groups, groups, chunk)
    return _summary(i2t, tuple(ks), "i2t") | _summary(t2i, tuple(ks), "t2i")


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, groups: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Row i of both feature matrices is a pair; groups[i] identifies its caption."""
    return as_floats(recall_tensors(image_features, text_features, groups, ks, chunk))


def recall_tensors_multi(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
                         ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Several captions per image (COCO, Flickr30k): text_image[j] is caption j's image. Image->text counts a hit
    on any of the image's captions, text->image on the caption's own image; same metric names as recall_tensors."""
    images = torch.arange(image_features.shape[0])
    i2t = first_hit_ranks(image_features, text_features, images, text_image, chunk)
    t2i = first_hit_ranks(text_features, image_features, text_image, images, chunk)
    return _summary(i2t, tuple(ks), "i2t") | _summary(t2i, tuple(ks), "t2i")
