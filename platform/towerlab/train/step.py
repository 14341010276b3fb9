"""One optimizer step of contrastive training on a worker (`contrastive_step`), and the loss terms averaged over
ranks for logging (`mean_over_ranks`).

With one micro-batch per step: forward, backward, step. With k: the feature cache (GradCache), so the loss sees
the whole global batch as negatives whatever the micro-batch.
"""

from __future__ import annotations

import torch

from towerlab.data.pipeline import expand_positives
from towerlab.losses.feature_cache import feature_cache_backward
from towerlab.train.module import ContrastiveTrainModule


def mean_over_ranks(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each rank's loss covers its own rows; the logged loss is the global batch's, i.e. the mean over ranks."""
    import torch.distributed as dist

    keys = sorted(terms)
    vec = torch.stack([terms[k].float().reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return dict(zip(keys, vec.tolist()))


def contrastive_step(engine, micro: list[dict], step: int) -> dict[str, torch.Tensor]:
    """One optimizer step over this worker's micro-batches. With one micro-batch: forward, backward, step. With k,
    the feature cache: the loss sees all k micro-batches of every rank as negatives (the whole global batch), and
    DeepSpeed steps at its accumulation boundary after the k-th backward."""
    micro = [expand_positives(b) for b in micro]  # k captions per image -> k positive pairs per image
    # on the engine's device (Ray Data hands host tensors unless told otherwise); the towers cast to their dtype
    micro = [{k: v.to(engine.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
             for b in micro]
    towers = engine.module.model.towers
    inputs = [{m: b[m] for m in towers if m in b} for b in micro]  # image, text and (synthetic3) signal
    if len(micro) == 1:
        out = engine(inputs[0], labels=micro[0]["label"], step=step)
        engine.backward(out["loss"])
        engine.step()
        return {k: v.detach() for k, v in out.items()}
    module: ContrastiveTrainModule = engine.module
    labels = torch.cat([b["label"] for b in micro])  # the cache concatenates micro-batches in this order

    def backward(surrogate: torch.Tensor, i: int, last: bool) -> None:
        engine.backward(surrogate, scale_wrt_gas=False)  # the surrogate already carries the full gradient
        engine.step()  # counts the micro-step; updates only at the k-th

    # encode through the engine's forward: under ZeRO-3 a direct call of the module left the gradients of the
    # accumulated micro-batches wrong (seen: ZeRO-3 losses diverged from ZeRO-0 from the second step)
    encode = lambda x: engine(x, features_only=True)  # noqa: E731
    return feature_cache_backward(encode, inputs, lambda f: module.loss(f, labels, step),
                                  params=module.loss_parameters(), backward_fn=backward)
