"""Losses that take their positives from labels (needs_labels), on data without labels: a batch labelled -1
everywhere is an error, never a silent zero loss; a -1 row is its own only positive; and with several captions
per image, the positives from image ids (data/pipeline.py expand_positives) give the loss of an independent
computation in which the captions of one image are its positives."""

from __future__ import annotations

import math

import pytest
import torch

import towerlab.losses as L
from loss_testing import make_feats
from towerlab.data.pipeline import expand_positives
from towerlab.losses.base import positive_mask

NEEDS = [n for n in L.LOSSES.names() if L.loss_class(n).needs_labels]
OTHERS = [n for n in L.LOSSES.names() if not L.loss_class(n).needs_labels]


def call(name: str, n: int, **meta):
    fn = L.build(name)
    feats = make_feats(n, 8, fn.cfg.modalities, seed=3, dtype=torch.float64)
    bias = None if fn.cfg.bias_init is None else torch.tensor(fn.cfg.bias_init, dtype=torch.float64)
    return fn(feats, logit_scale=torch.tensor(10.0, dtype=torch.float64), logit_bias=bias, step=5, **meta)


def test_the_families_that_need_labels():
    assert set(NEEDS) == {"decoupled_softmax", "hard_negative_mixing", "mw_auc", "sdm"}


@pytest.mark.parametrize("name", NEEDS)
def test_unlabelled_batch_is_an_error_not_a_zero_loss(name):
    unlabelled = torch.full((8,), -1)
    with pytest.raises(ValueError) as e:
        call(name, 8, labels=unlabelled)
    msg = str(e.value)
    assert f"loss '{name}' takes its positives from labels" in msg and "loss.name=clip" in msg and "\n" not in msg
    assert torch.isfinite(call(name, 8, labels=torch.tensor([0, 1, 0, 2, 1, -1, 3, 0]))["loss"])


@pytest.mark.parametrize("name", OTHERS)
def test_families_without_labels_ignore_them(name):
    out = call(name, 8, labels=torch.full((8,), -1))
    assert torch.isfinite(out["loss"])


def test_an_unlabelled_row_is_its_own_only_positive():
    labels = torch.tensor([0, -1, 0, -1, 1])
    pos = positive_mask(5, {"labels": labels})
    assert pos.tolist() == [[True, False, True, False, False],
                            [False, True, False, False, False],
                            [True, False, True, False, False],
                            [False, False, False, True, False],
                            [False, False, False, False, True]]
    # a partly labelled batch trains (its labelled rows give the positives)
    assert torch.isfinite(call("sdm", 5, labels=labels)["loss"])


def naive(name: str, q: torch.Tensor, k: torch.Tensor, t: float, same) -> float:
    """One direction, by explicit loops; `same(i, j)`: whether key j is a positive of query i."""
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        z = [t * float(q[i] @ k[j]) for j in range(n)]
        pos = [j for j in range(n) if same(i, j)]
        if name == "sdm":
            lse = math.log(sum(math.exp(a) for a in z))
            total += sum(math.exp(a - lse) * ((a - lse) - math.log((1 / len(pos) if j in pos else 0.0) + 1e-8))
                         for j, a in enumerate(z))
        else:  # decoupled softmax: each positive against the negatives only
            neg = sum(math.exp(z[j]) for j in range(n) if j not in pos)
            total += sum(-math.log(math.exp(z[j]) / (math.exp(z[j]) + neg)) for j in pos) / len(pos)
    return total / n


@pytest.mark.parametrize("name", [n for n in NEEDS if L.loss_class(n).multi_positive])
def test_positives_from_image_ids_with_several_captions(name):
    b, k, length = 4, 3, 6
    ids = torch.tensor([17, 3, 42, 8])
    batch = {"image": torch.rand(b, 3, 2, 2), "text": torch.randint(0, 9, (b, k, length)), "id": ids,
             "label": torch.full((b,), -1)}  # unlabelled data: only the image ids say what belongs together
    pairs = expand_positives(batch)
    assert pairs["text"].shape == (b * k, length) and torch.equal(pairs["label"], ids.repeat_interleave(k))
    n = b * k
    feats = make_feats(n, 5, seed=11, dtype=torch.float64)
    out = L.build(name)(feats, logit_scale=torch.tensor(10.0, dtype=torch.float64), labels=pairs["label"])
    x, y = feats["image"].detach(), feats["text"].detach()
    same = lambda i, j: i // k == j // k  # noqa: E731: rows i and j come from the same image
    i2t, t2i = naive(name, x, y, 10.0, same), naive(name, y, x, 10.0, same)
    expected = i2t + t2i if name == "sdm" else 0.5 * (i2t + t2i)
    assert math.isclose(out["loss"].item(), expected, rel_tol=1e-10)
    # and not what the same rows give with the diagonal alone as positives (one caption per image)
    diagonal = L.build(name)(feats, logit_scale=torch.tensor(10.0, dtype=torch.float64))["loss"]
    assert not math.isclose(diagonal.item(), expected, rel_tol=1e-3)
