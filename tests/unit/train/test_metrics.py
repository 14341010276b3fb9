"""What a run reports, known before it starts (train/metrics.py): every evaluator type returns exactly the metric
names it declares, and the loss terms the training step logs are among the recipe's declared metrics."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from towerlab.config import EvaluatorConfig
from towerlab.train.evaluate import EVALUATORS, EvalData, metric_names
from towerlab.train.metrics import logged_metrics
from towerlab.train.module import build_module
from towerlab.train.recipe import load_recipe


def tiny_data(n: int = 12, classes: int = 4, d: int = 8) -> tuple[EvalData, dict]:
    g = torch.Generator().manual_seed(0)
    feats = {k: F.normalize(torch.randn(m, d, generator=g), dim=-1)
             for k, m in (("image", n), ("text", n), ("prompts", classes * 2))}
    data = EvalData(key="tiny", image=torch.zeros(n), text=torch.zeros(n), labels=torch.arange(n) % classes,
                    groups=torch.arange(n) // 2, prompts=torch.zeros(classes * 2), prompts_per_class=2)
    data.train = replace(data, key="tiny_train")  # a linear probe's train split (the same features here)
    return data, feats


@pytest.mark.parametrize("kind", EVALUATORS.names())
@pytest.mark.parametrize("ks", [[], [1, 3], [2]])
def test_each_evaluator_returns_what_it_declares(kind, ks):
    data, feats = tiny_data()
    cfg = EvaluatorConfig(type=kind, ks=ks)
    model = SimpleNamespace(logit_scale=torch.tensor([math.log(10.0)]))
    out = EVALUATORS.get(kind)(cfg, data, lambda d, what: feats[what], model)
    assert sorted(out) == sorted(metric_names(cfg)) and len(set(metric_names(cfg))) == len(metric_names(cfg))


def test_declared_metrics_follow_ks():
    assert metric_names(EvaluatorConfig(type="zeroshot")) == ("top1", "top5")
    assert metric_names(EvaluatorConfig(type="zeroshot", ks=[3])) == ("top3",)
    assert "recall_at_10_t2i" in metric_names(EvaluatorConfig(type="retrieval"))


@pytest.mark.parametrize("name", ["clip", "siglip", "hard_negative_mixing", "multihead", "dcl"])
def test_the_training_steps_terms_are_declared(repo_root, name):
    recipe = load_recipe(repo_root / "recipes" / "debug.yaml", [f"loss.name={name}"])
    declared = logged_metrics(recipe)
    # what train/module.py's loss returns, which train/loop.py logs as train/TERM
    module = build_module(recipe, 0, 1)
    v = recipe.model.vision
    x = {"image": torch.rand(4, v.channels, v.image_size, v.image_size),
         "text": torch.randint(0, 20, (4, recipe.model.text.context_length))}
    with torch.no_grad():
        terms = module(x, labels=torch.arange(4), step=0)
    assert {f"train/{k}" for k in terms} <= set(declared)
    assert {"train/lr", "train/epoch", "train/samples_per_s", "eval/zeroshot/top1"} <= set(declared)
    assert len(terms) >= 2 and all(k.startswith(("train/", "eval/", "data/")) for k in declared)

