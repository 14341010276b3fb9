"""Evaluation at scale: each rank embeds its share of an evaluation set, and the shares are gathered once.

Two things keep an evaluation of tens of thousands of images from filling the host or stalling one worker:

- `EncodedImages`: the images stay as the reader yields them (encoded bytes, or where to read them: an image file's
  path, a member of a tar shard) and are preprocessed a chunk at a time as they are embedded, so the pixels in
  memory are those of one chunk (O(batch x image)), not of the whole set (O(N x image)); beyond that an evaluation
  holds the O(N x d) embeddings.
- `embed_sharded`: with a torch.distributed process group of W ranks, rank r embeds the contiguous block
  `share(N, r, W)` of the rows, in chunks of `batch`; the blocks, padded to equal length, are gathered once with
  all_gather (trimmed back to N rows, in the original order), so every rank holds the full N x d matrix and computes
  the metrics as before. Under ZeRO-3 every forward all-gathers the parameters, so every rank must run the same
  number of forwards: each runs ceil(ceil(N / W) / batch) = ceil(N / (W x batch)), a rank whose block is used up
  running the remaining ones on a one-row dummy chunk (the set's first row) whose output is dropped.
  Without a process group (W = 1) it is the plain chunked embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from towerlab.config import ConfigError


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one (`towerlab eval`, single-worker runs)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int, rank: int, world: int) -> range:
    """The rows rank `rank` of `world` embeds: a contiguous block of ceil(n / world) rows (the last ranks' blocks
    shorter or empty), so the gathered blocks are the rows in order."""
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


class EncodedImages:
    """Evaluation images as read (encoded bytes, or anything with read_bytes(), read when needed: a Path, a tar
    shard's member), preprocessed by `pre.image` (the run's
    eval preprocessing: data.pipeline.Preprocessor, no augmentation) only when a slice is taken: `images[a:b]` is
    the [b - a, 3, S, S] float tensor of those rows. Sized and sliced like the tensor it stands for."""

    def __init__(self, items: Sequence[bytes | Path | Any], pre, where: str):
        self.items, self.pre, self.where = list(items), pre, where

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, i: int) -> np.ndarray:
        item = self.items[i]
        stored = hasattr(item, "read_bytes")
        try:
            return self.pre.image(item.read_bytes() if stored else item)
        except Exception as e:  # PIL raises many types for undecodable bytes; a file may have gone
            raise ConfigError(f"{self.where}: image {i}{f' ({item})' if stored else ''} does not "
                              f"decode ({type(e).__name__}: {e}): fix or remove it") from None

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError("EncodedImages takes slices (a chunk of rows), e.g. images[0:64]")
        rows = range(len(self.items))[index]
        if not rows:
            s = self.pre.image_size
            return torch.zeros(0, 3, s, s)
        return torch.from_numpy(np.stack([self.pixels(i) for i in rows]))

    def check(self, rows: range) -> None:
        """Decode `rows` once (this rank's share), so an undecodable image is a ConfigError when the evaluators are
        built, not in the middle of training."""
        for i in rows:
            self.pixels(i)


def embed_share(encode: Callable[[torch.Tensor], torch.Tensor], x, batch: int, rank: int,
                world: int) -> tuple[torch.Tensor, int]:
    """This rank's block of the embeddings of `x` (anything sized and sliced into tensors: a tensor, EncodedImages),
    zero-padded to ceil(N / world) rows, and the number of forwards run (the same on every rank)."""
    n = len(x)
    per = -(-n // world)
    rows = share(n, rank, world)
    forwards = -(-per // batch)
    outs, dummy = [], None
    for f in range(forwards):
        a = rows.start + f * batch
        b = min(rows.stop, a + batch)
        if a < b:
            outs.append(encode(x[a:b]))
        else:  # this rank's block is used up: a forward the others still run (ZeRO-3), its output dropped
            dummy = encode(x[0:1])
    if not forwards:  # an empty set: nothing to embed, as without ranks (torch.cat of nothing)
        return torch.cat(outs), 0
    like = outs[0] if outs else dummy
    local = torch.cat(outs) if outs else like[:0]
    if len(local) < per:
        local = torch.cat([local, like.new_zeros(per - len(local), *like.shape[1:])])
    return local, forwards


def embed_sharded(encode: Callable[[torch.Tensor], torch.Tensor], x, batch: int) -> torch.Tensor:
    """The embeddings of all rows of `x`, each rank embedding its share and all_gather joining them once (module
    docstring); without a process group, `x` in chunks of `batch` as one process."""
    rank, world = rank_world()
    if world == 1:
        return torch.cat([encode(x[i : i + batch]) for i in range(0, len(x), batch)])
    local, _ = embed_share(encode, x, batch, rank, world)
    blocks = [torch.empty_like(local) for _ in range(world)]  # equal sizes: every block is padded to ceil(N / W)
    dist.all_gather(blocks, local)
    return torch.cat(blocks)[: len(x)]
