"""The evaluators on PyTorch's meta device: host evaluation data (as load_eval_data builds it) against a model on
meta. Every chunk must move to the model's device and every metric be computed there; a tensor made on the CPU
along the way (labels, caption groups, the logit scale, index ranges, accumulators) raises a device mismatch."""

from __future__ import annotations

import pytest
import torch

from towerlab.config.schema import EvaluatorConfig
from towerlab.models import ContrastiveModel
from towerlab.train.evaluate import EVALUATORS, Embedder, EvalData
from towerlab.train.recipe import load_recipe

META = torch.device("meta")


# evaluators that declare on_host (linear_probe: scikit-learn fits on host copies of the features) are not held to it
@pytest.mark.parametrize("kind", sorted(k for k in EVALUATORS.names()
                                        if not getattr(EVALUATORS.get(k), "on_host", False)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluator_computes_on_the_model_device(repo_root, kind, dtype):
    recipe = load_recipe(repo_root / "recipes" / "debug.yaml")
    v, t = recipe.model.vision, recipe.model.text
    with torch.device(META):
        model = ContrastiveModel(recipe.model).to(dtype).eval()
    n, classes, per_class = 10, 4, 2
    data = EvalData(key="k", image=torch.randn(n, 3, v.image_size, v.image_size),
                    text=torch.randint(1, t.vocab_size, (n, t.context_length)), labels=torch.arange(n) % classes,
                    groups=torch.arange(n) % 7, prompts=torch.randint(1, t.vocab_size, (classes * per_class,
                                                                                         t.context_length)),
                    prompts_per_class=per_class)
    embed = Embedder(model, batch_size=4)  # 3 chunks, the last short
    out = EVALUATORS.get(kind)(EvaluatorConfig(type=kind, chunk=3), data, embed, model)
    assert out and all(isinstance(x, torch.Tensor) and x.device == META for x in out.values()), out
    assert embed(data, "image").device == META
