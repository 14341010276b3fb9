"""The benchmark tests' recipe builder and tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from towerlab.data import read_manifest
from towerlab.data.pipeline import preprocessor
from towerlab.models import ContrastiveModel
from towerlab.train.evaluate import Evaluators
from towerlab.train.recipe import load_recipe


@pytest.fixture
def env(repo_root, digits_dir, monkeypatch):
    """A recipe builder over the digits vocabulary and a tiny random model."""
    monkeypatch.chdir(repo_root)
    manifest = read_manifest(digits_dir)

    def build(evals: dict):
        recipe = load_recipe("recipes/digits_clip.yaml", [f"data.path={digits_dir}", "model.arch=debug",
                                                           "eval.batch_size=7", f"evals={json.dumps(evals)}"])
        pre = preprocessor(recipe, manifest, train=False)
        return recipe, Evaluators(recipe, manifest, pre), pre

    torch.manual_seed(0)
    recipe, _, _ = build({})
    return build, ContrastiveModel(recipe.model, temperature_init=0.05).eval()
