"""Geometry metrics against independent numpy/scipy computations on known embeddings."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist

from towerlab.eval import alignment, effective_rank, geometry, modality_gap, uniformity


def _pairs(n=50, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g) + 1.5, dim=1)  # a cone, as real embeddings are
    txt = F.normalize(torch.randn(n, d, generator=g) - 1.0, dim=1)
    return img, txt


def test_modality_gap_and_alignment_match_numpy():
    img, txt = _pairs()
    a, b = img.numpy().astype(np.float64), txt.numpy().astype(np.float64)
    assert abs(modality_gap(img, txt) - np.linalg.norm(a.mean(0) - b.mean(0))) < 1e-9
    assert abs(alignment(img, txt) - np.mean(np.sum((a - b) ** 2, axis=1))) < 1e-9
    # known values: identical modalities have no gap and perfect alignment; opposite points are 2 apart
    assert modality_gap(img, img) == 0 and alignment(img, img) == 0
    e = torch.eye(3)
    assert abs(modality_gap(e, -e) - 2 * np.linalg.norm(np.ones(3) / 3)) < 1e-12 and alignment(e, -e) == 4


def test_uniformity_matches_scipy_pdist_in_any_chunking():
    img, _ = _pairs()
    expected = math.log(np.mean(np.exp(-2 * pdist(img.numpy().astype(np.float64), "sqeuclidean"))))
    for chunk in (1, 7, 1000):
        assert abs(uniformity(img, chunk=chunk) - expected) < 1e-6
    # known value: two antipodal points, ||u - v||^2 = 4 -> log exp(-8) = -8
    assert abs(uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) + 8) < 1e-9


def test_effective_rank_matches_numpy_svd():
    img, _ = _pairs()
    s = np.linalg.svd(img.numpy().astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert abs(effective_rank(img) - np.exp(-(p * np.log(p)).sum())) < 1e-6
    # known values: k orthonormal directions with equal weight have effective rank k; one direction has rank 1
    assert abs(effective_rank(torch.eye(4)) - 4) < 1e-4
    assert abs(effective_rank(torch.ones(10, 4)) - 1) < 1e-4


def test_geometry_names_every_metric():
    img, txt = _pairs()
    out = geometry(img, txt, logit_scale=14.3)
    assert set(out) == {"modality_gap", "alignment", "uniformity_image", "uniformity_text", "effective_rank_image",
                        "effective_rank_text", "logit_scale"}
    assert out["logit_scale"] == 14.3 and all(math.isfinite(v) for v in out.values())
