"""What a loss class says about itself (needs_labels, multi_positive, one_logit_matrix), read through
`loss_class(name)`: the attributes agree with what each family computes."""

import pytest
import torch

import towerlab.losses as L
from loss_testing import CASES, build_case, case_meta, make_feats, make_labels
from towerlab.losses.base import ContrastiveLoss
from towerlab.registry import RegistryError

IDS = [c["id"] for c in CASES]


def test_loss_class_is_the_registered_class():
    for name in L.LOSSES.names():
        cls = L.loss_class(name)
        assert issubclass(cls, ContrastiveLoss) and isinstance(L.build(name), cls)
    with pytest.raises(RegistryError, match="Did you mean 'clip'"):
        L.loss_class("clpi")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_needs_labels_says_whether_labels_change_the_loss(case):
    # Labels with repeated classes: a family that takes positives from them computes something else with them.
    fn, log_scale, bias = build_case(case)
    feats = make_feats(8, 6, fn.cfg.modalities, seed=21)
    meta = {k: v for k, v in case_meta(case, 8).items() if k != "labels"}
    without = fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, **meta)["loss"]
    with_labels = fn(feats, logit_scale=log_scale.exp(), logit_bias=bias, labels=make_labels(8), **meta)["loss"]
    changed = not torch.equal(without, with_labels)
    assert changed == L.loss_class(case["name"]).needs_labels, case["id"]


def test_multi_positive_families_take_positives_from_labels():
    multi = {n for n in L.LOSSES.names() if L.loss_class(n).multi_positive}
    assert multi == {"decoupled_softmax", "sdm"}
    assert all(L.loss_class(n).needs_labels for n in multi)


def test_one_logit_matrix_is_the_sigmoid_family_only():
    assert {n for n in L.LOSSES.names() if L.loss_class(n).one_logit_matrix} == {"siglip"}
