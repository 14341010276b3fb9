"""The differentiable all-gather every distributed loss uses.

`torch.distributed.all_gather` carries no gradient; a gather without gradient leaves each rank with only the
gradient of its own loss terms for its own rows (the SLIP/GRAM bug, reference/losses.md §1, §9). Here the backward
returns this rank's slice of the SUM over ranks of the incoming gradients: every rank's loss terms send their
gradient back to the rank that owns the rows. With the trainer averaging parameter gradients over ranks, the result
is the gradient of the mean of the per-rank losses, i.e. of the full-batch loss.

All ranks must contribute tensors of the same shape (equal per-rank batches). Without an initialised process group,
or with world size 1, both functions return their input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows = t.shape[0]
        return _gather(t.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        b, rank = ctx.rows, dist.get_rank()
        grad = grad.contiguous().clone()  # the collective writes in place; autograd may share `grad`
        if dist.get_backend() == "nccl":  # reduce-scatter moves 1/W of the data; gloo does not implement it
            out = torch.empty_like(grad[:b])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # SUM
        return grad[rank * b : (rank + 1) * b]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate `t` along dim 0 over the default process group, with gradient (see module docstring)."""
    if _world() == 1:
        return t
    return _AllGatherWithGrad.apply(t)


@torch.no_grad()
def gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate along dim 0 over ranks without gradient (labels, ids, frozen-tower features)."""
    if _world() == 1:
        return t
    return _gather(t.contiguous())
