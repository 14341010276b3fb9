"""The names of the metrics a recipe's run reports (to MLflow and to Ray Tune), known before it starts, so a sweep's
`metric` can be checked against them at load instead of a sweep whose scheduler never sees its metric.

Worked out from the recipe, not from a list kept by hand:
- train/TERM for every term the loss family returns (its "loss" and named terms, e.g. loss_i2t, mixing), found by
  calling the loss once on a tiny batch of random features, plus train/logit_scale (train/module.py adds it) and
  the loop's own train/lr, train/samples_per_s, train/epoch and train/samples (train/loop.py);
- eval/NAME/METRIC for every evaluator of `evals`, as its type declares (train/evaluate.py `declares`).
Foreign (web) data adds data/skipped_samples_epoch. (Tune also receives `step` and `samples`, its time attributes,
not metrics.)
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from towerlab import losses
from towerlab.config import Recipe
from towerlab.train.evaluate import metric_names

# train/loop.py, train/module.py
LOOP = ("train/lr", "train/samples_per_s", "train/epoch", "train/samples", "train/logit_scale")
FOREIGN = "data/skipped_samples_epoch"  # train/loop.py, for shards without a towerlab manifest


def loss_terms(recipe: Recipe) -> tuple[str, ...]:
    """The terms the recipe's loss returns ("loss" and the family's named terms), from one call on a tiny batch."""
    cfg = recipe.loss
    fn = losses.build(**asdict(cfg))
    n, d = 4, recipe.model.embed_dim  # the features' real width (multihead splits it into heads)
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) for m in cfg.modalities}
    bias = None if cfg.bias_init is None else torch.tensor(float(cfg.bias_init))
    with torch.no_grad():
        out = fn(feats, logit_scale=torch.tensor(1.0 / cfg.temperature_init), logit_bias=bias,
                 labels=torch.arange(n), step=0)
    return tuple(out)


def logged_metrics(recipe: Recipe) -> list[str]:
    """Every metric name a run of `recipe` reports, sorted."""
    names = {f"train/{t}" for t in loss_terms(recipe)} | set(LOOP)
    if recipe.data.source in ("webdataset", "parquet"):  # may be foreign shards; which, only the data can tell
        names.add(FOREIGN)
    for name, cfg in recipe.evals.items():
        names |= {f"eval/{name}/{m}" for m in metric_names(cfg)}
    return sorted(names)

