"""Gradient accumulation that keeps every sample of the global batch as a negative: the feature cache
(GradCache, Gao et al. 2021; reference/losses.md §12.2).

Plain accumulation over k micro-batches computes k small losses, each with only its micro-batch as negatives.
`feature_cache_backward` gives exactly the gradient of ONE loss over all k micro-batches (and, through the
all-gather inside `loss_fn`, over all ranks), with the activation memory of one micro-batch:

1. Embed every micro-batch without grad, recording the RNG state before each (dropout, augment-in-model).
2. Concatenate the cached features, make them leaves that require grad, compute the full loss on them (loss_fn
   all-gathers with grad and calls the loss with rank/world size) and take d loss / d features, and the gradient
   of the tensors the loss uses directly (`params`: logit scale, bias, the loss module's own parameters) ONCE.
3. Re-embed each micro-batch with grad under its recorded RNG state and backpropagate the surrogate
   <features_i, cached_grad_i> (plus <p, dp> for `params` on the first micro-batch only, so the logit scale gets
   its gradient once, not k times). Parameter gradients accumulate to exactly d loss / d theta.

Calling it from a training step:

    out = feature_cache_backward(
        encode_fn=lambda mb: model({m: mb[m] for m in ("image", "text")}),   # local, normalised features
        micro_batches=chunks,                                               # k chunks of this rank's batch
        loss_fn=lambda f: loss({m: all_gather_with_grad(v) for m, v in f.items()},
                               logit_scale=model.logit_scale.exp(), logit_bias=model.logit_bias,
                               rank=rank, world_size=world, labels=gathered_labels, step=step),
        params=[model.logit_scale, model.logit_bias, *loss.parameters()],   # those that require grad
    )

Labels or other meta must follow the order of the concatenated micro-batches (chunk 0's rows first).

With a DeepSpeed engine: configure `gradient_accumulation_steps = k`, encode through the engine's module (ZeRO-3
gathers parameters in its hooks, also under no_grad), and pass
`backward_fn=lambda surrogate, i, last: (engine.backward(surrogate, scale_wrt_gas=False), engine.step())`:
`scale_wrt_gas=False` because the surrogate already carries the full-batch gradient (DeepSpeed would divide it by
k), and `engine.step()` after every backward lets the engine count micro-steps and reduce across ranks and update
only at the k-th (the accumulation boundary). DeepSpeed averages gradients over ranks, as the loss convention
expects. Caveats: BatchNorm statistics are per micro-batch; step 2 runs the whole loss, so its memory is that of
the loss over the global batch (use `loss.tiled: true` at large batch).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

Features = dict[str, Tensor]


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay(state: tuple[Tensor, list[Tensor]]) -> Iterator[None]:
    """Run under a recorded RNG state without disturbing the caller's RNG stream."""
    devices = list(range(len(state[1])))
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if devices:
            torch.cuda.set_rng_state_all(state[1])
        yield


def feature_cache_backward(
    encode_fn: Callable[[Any], Features],
    micro_batches: Sequence[Any],
    loss_fn: Callable[[Features], dict[str, Tensor]],
    params: Sequence[Optional[Tensor]] = (),
    backward_fn: Optional[Callable[[Tensor, int, bool], Any]] = None,
) -> dict[str, Tensor]:
    """Accumulate into .grad (or through `backward_fn`) the exact gradient of loss_fn over the concatenation of
    all micro-batches; return the loss terms (detached). See the module docstring for the protocol."""
    if not micro_batches:
        raise ValueError("feature_cache_backward needs at least one micro-batch")
    params = [p for p in params if p is not None and p.requires_grad]

    states, cached = [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state())
            cached.append(encode_fn(mb))
    mods = list(cached[0])
    sizes = [c[mods[0]].shape[0] for c in cached]
    reps = {m: torch.cat([c[m] for c in cached]).detach().requires_grad_() for m in mods}
    del cached

    with torch.enable_grad():
        out = loss_fn(reps)
        grads = torch.autograd.grad(out["loss"], [*reps.values(), *params], allow_unused=True)
    feat_grads = {m: g if g is not None else torch.zeros_like(reps[m]) for m, g in zip(mods, grads)}
    param_grads = grads[len(mods) :]

    offset = 0
    for i, (mb, state, n) in enumerate(zip(micro_batches, states, sizes)):
        with _replay(state):
            feats = encode_fn(mb)
        surrogate = sum((feats[m] * feat_grads[m][offset : offset + n].to(feats[m].dtype)).sum() for m in mods)
        if i == 0:  # the loss's own tensors get their gradient once
            surrogate = surrogate + sum((p * g).sum() for p, g in zip(params, param_grads) if g is not None)
        offset += n
        last = i == len(micro_batches) - 1
        if backward_fn is None:
            surrogate.backward()
        else:
            backward_fn(surrogate, i, last)
    return {k: v.detach() for k, v in out.items()}
