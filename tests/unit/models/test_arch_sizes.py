"""Architecture files against OpenCLIP's published parameter totals (image + text towers + logit scale, from
OpenCLIP's docs/model_profile.csv, in millions). Built on the meta device: shapes only, no memory."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from towerlab.config import ModelConfig
from towerlab.models import ContrastiveModel, arch_preset, archs

PUBLISHED_M = {"ViT-B-32": 151.28, "ViT-B-16": 149.62, "ViT-L-14": 427.62, "ViT-H-14": 986.11, "ViT-g-14": 1366.68}


def _count(arch: str) -> int:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), arch_preset(arch)))
    with torch.device("meta"):
        model = ContrastiveModel(cfg)
    assert all(p.is_meta for p in model.parameters())  # nothing was materialised
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(PUBLISHED_M))
def test_parameter_count_matches_openclip(arch):
    n = _count(arch) / 1e6
    assert abs(n - PUBLISHED_M[arch]) / PUBLISHED_M[arch] < 0.01, f"{arch}: {n:.2f}M vs {PUBLISHED_M[arch]}M"


def test_all_sizes_are_found_and_ordered():
    assert {"debug", "tiny", *PUBLISHED_M} <= set(archs().names())
    sizes = [_count(a) for a in ("debug", "tiny", "ViT-B-32", "ViT-L-14", "ViT-H-14", "ViT-g-14")]
    assert sizes == sorted(sizes) and sizes[-1] > 1.3e9
