"""The global-batch resolver: global batch -> micro-batch x accumulation x world size.

A contrastive loss's negatives are the other samples its rows are compared with. With the feature cache (see
towerlab.losses.feature_cache) accumulation keeps every sample of the global batch as a negative, so the negatives
per step are the global batch minus one; plain DeepSpeed accumulation would only see one micro-batch's worth.
"""

from __future__ import annotations

from dataclasses import dataclass

from towerlab.config.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int  # per worker and forward pass
    accumulation: int  # micro-batches per worker per optimizer step
    world_size: int

    @property
    def per_worker(self) -> int:
        return self.micro_batch * self.accumulation

    @property
    def negatives(self) -> int:
        return self.global_batch - 1

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = micro-batch {self.micro_batch} x accumulation {self.accumulation}"
            f" x {self.world_size} workers; each sample sees {self.negatives} negatives per step"
        )


def resolve_batch(global_batch: int, world_size: int, micro_batch: int | None = None) -> BatchPlan:
    if global_batch < 2:
        raise ConfigError(f"data.global_batch={global_batch}: a contrastive batch needs at least 2 samples")
    if world_size < 1:
        raise ConfigError(f"train.workers={world_size}: need at least 1 worker")
    if micro_batch is None:
        if global_batch % world_size:
            raise ConfigError(
                f"data.global_batch={global_batch} is not divisible by train.workers={world_size}: "
                f"use a multiple of {world_size} (e.g. {global_batch - global_batch % world_size or world_size})"
            )
        micro_batch = global_batch // world_size
    if micro_batch < 1:
        raise ConfigError(f"data.micro_batch={micro_batch}: must be at least 1")
    if global_batch % (micro_batch * world_size):
        raise ConfigError(
            f"data.global_batch={global_batch} is not divisible by data.micro_batch={micro_batch} x "
            f"train.workers={world_size} = {micro_batch * world_size}: change one of them"
        )
    return BatchPlan(global_batch, micro_batch, global_batch // (micro_batch * world_size), world_size)
