"""Metric tensors to numbers. The metrics are computed as 0-d tensors on the embeddings' device (a GPU, or meta in
the device tests) and cross to the host once per evaluation, here."""

from __future__ import annotations

import torch


def as_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """{name: float}, with one device-to-host transfer for all tensor values."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().double().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in metrics}
