"""The 3-modality synthetic source and the signal tower: what recipes/synthetic3.yaml trains."""

import numpy as np
import pytest
import torch

from towerlab.config import ConfigError
from towerlab.data import synthetic
from towerlab.data.pipeline import load_split, preprocessor
from towerlab.data.sources import prepare
from towerlab.train.dataset import check_prepared
from towerlab.train.module import build_module
from towerlab.train.recipe import load_recipe


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare("synthetic3", tmp_path_factory.mktemp("s3") / "s3", size=400)


def test_signals_carry_the_class(prepared):
    assert prepared.columns[-1] == "signal" and prepared.data["signal_dim"] == 16
    recipe = load_recipe(None, ["data.source=synthetic3", "model.signal.dim=16"])
    x = load_split(prepared, "heldout", preprocessor(recipe, prepared, train=False))
    assert x["signal"].shape == (80, 16) and x["signal"].dtype == np.float32
    # nearest class prototype, computed here from the prototypes alone, recovers the label
    protos = synthetic.prototypes(16)
    nearest = ((x["signal"][:, None, :] - protos[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == x["label"]).mean() > 0.95


def test_signal_tower_and_three_modality_losses(repo_root, prepared):
    recipe = load_recipe(repo_root / "recipes" / "synthetic3.yaml")
    x = load_split(prepared, "heldout", preprocessor(recipe, prepared, train=False))
    inputs = {m: torch.from_numpy(x[m]) for m in ("image", "text", "signal")}
    for name in ("symile", "gram"):
        module = build_module(load_recipe(repo_root / "recipes" / "synthetic3.yaml", [f"loss.name={name}"]), 0, 1)
        feats = module(inputs, features_only=True)
        assert feats["signal"].shape == (80, recipe.model.embed_dim)
        assert torch.allclose(feats["signal"].norm(dim=-1), torch.ones(80), atol=1e-5)
        out = module(inputs, labels=torch.from_numpy(x["label"]))
        out["loss"].backward()  # every tower gets a gradient from the 3-modality loss
        assert module.model.towers["signal"].proj.grad.abs().sum() > 0, name
        assert module.model.towers["image"].proj.grad.abs().sum() > 0, name


def test_modalities_must_have_towers_and_data(repo_root, prepared, tmp_path):
    s3 = repo_root / "recipes" / "synthetic3.yaml"
    with pytest.raises(ConfigError, match=r"no tower for \['signal'\].*model.signal.dim > 0"):
        load_recipe(s3, ["model.signal.dim=0"])
    with pytest.raises(ConfigError, match="model.signal.dim=8 but .* has signals of 16 features: set model.signal.dim=16"):
        check_prepared(load_recipe(s3, ["model.signal.dim=8"]), prepared)
    plain = prepare("synthetic", tmp_path / "plain", size=100)
    with pytest.raises(ConfigError, match="no 'signal' column: use data.source=synthetic3"):
        check_prepared(load_recipe(s3), plain)
