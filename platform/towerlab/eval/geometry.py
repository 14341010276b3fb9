"""Embedding geometry of paired, L2-normalised embeddings (row i of `image` and `text` is a pair):

- modality_gap: distance between the two modalities' centroids (Liang et al., "Mind the Gap", 2022);
- alignment: mean squared distance of a pair, E||f(x) - g(y)||^2 (Wang & Isola, 2020, alpha = 2);
- uniformity_<modality>: log E exp(-t ||u - v||^2) over distinct pairs of one modality (Wang & Isola, t = 2),
  computed over row chunks with a running log-sum-exp, so memory stays O(chunk x N);
- effective_rank_<modality>: exp of the entropy of the normalised singular values of the embedding matrix
  (Roy & Vetterli, 2007; as RankMe, Garrido et al., 2023, uses it for collapse);
- logit_scale: the model's current exp(t'), passed in by the caller.

Each metric is a 0-d float64 tensor on the embeddings' device (`geometry_tensors`); `geometry` turns the set into
numbers with one host transfer.
"""

from __future__ import annotations

import math

import torch

from towerlab.eval.numbers import as_floats

RANK_EPS = 1e-7  # RankMe's epsilon: keeps log(p) finite for zero singular values


def modality_gap(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return (image.double().mean(0) - text.double().mean(0)).norm()


def alignment(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return (image.double() - text.double()).pow(2).sum(1).mean()


def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 1024) -> torch.Tensor:
    x = x.double()
    n = x.shape[0]
    if n < 2:
        return torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    total = torch.full((), float("-inf"), dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        block = x[start : start + chunk]
        sq = (2 - 2 * block @ x.T).clamp_min(0)  # unit vectors: ||u - v||^2 = 2 - 2 u.v
        rows = torch.arange(block.shape[0], device=x.device)
        sq[rows, rows + start] = float("inf")  # u = v is not a pair
        total = torch.logaddexp(total, torch.logsumexp((-t * sq).flatten(), 0))
    return total - math.log(n * (n - 1))


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum() + RANK_EPS
    return torch.exp(-(p * p.log()).sum())


def geometry_tensors(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                     chunk: int = 1024) -> dict[str, torch.Tensor]:
    """The metrics as 0-d tensors on the embeddings' device (no host transfer)."""
    scale = torch.as_tensor(logit_scale, dtype=torch.float64).to(image.device).reshape(())
    return {
        "modality_gap": modality_gap(image, text),
        "alignment": alignment(image, text),
        "uniformity_image": uniformity(image, chunk=chunk),
        "uniformity_text": uniformity(text, chunk=chunk),
        "effective_rank_image": effective_rank(image),
        "effective_rank_text": effective_rank(text),
        "logit_scale": scale,
    }


def geometry(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
             chunk: int = 1024) -> dict[str, float]:
    return as_floats(geometry_tensors(image, text, logit_scale, chunk))
