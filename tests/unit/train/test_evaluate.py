"""The recipe's evaluators on a real (untrained) model and the built-in digits: names, cadence, one embedding per
input per evaluation, results equal to the metric functions on the model's own embeddings, the geometry plot in a
real MLflow store."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from towerlab.config import ConfigError
from towerlab.data import read_manifest
from towerlab.data.pipeline import preprocessor
from towerlab.eval import class_embeddings, geometry, recall_at_k, topk_accuracy
from towerlab.models import ContrastiveModel
from towerlab.tracking import MlflowRun
from towerlab.train.evaluate import Evaluators
from towerlab.train.recipe import load_recipe


@pytest.fixture
def setup(repo_root, digits_dir, monkeypatch):
    monkeypatch.chdir(repo_root)
    recipe = load_recipe("recipes/digits_clip.yaml", [f"data.path={digits_dir}", "model.arch=debug", "eval.every=4",
                                                       "eval.batch_size=100", "evals.geometry.every=6"])
    manifest = read_manifest(digits_dir)
    torch.manual_seed(0)
    model = ContrastiveModel(recipe.model, temperature_init=0.05)
    return recipe, Evaluators(recipe, manifest, preprocessor(recipe, manifest, train=False)), model


def test_default_evaluators_names_cadence_and_values(setup):
    recipe, evaluators, model = setup
    assert sorted(recipe.evals) == ["geometry", "retrieval", "zeroshot"]
    assert evaluators.due(4) == ["zeroshot", "retrieval"] and evaluators.due(6) == ["geometry"]
    assert evaluators.due(5) == [] and len(evaluators.due(5, last=True)) == 3

    calls = {"image": 0, "text": 0}
    for m in calls:
        model.towers[m].register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    out = evaluators(model, 12)
    data = evaluators.data["zeroshot"]
    n = len(data.image)
    # images once for all three evaluators (4 chunks of 100 for 359 digits); texts: captions + class prompts once
    assert calls["image"] == -(-n // 100)
    assert calls["text"] == -(-n // 100) + -(-len(data.prompts) // 100)

    with torch.no_grad():
        img, txt = model.encode("image", data.image[:]), model.encode("text", data.text)
        cls = class_embeddings(model.encode("text", data.prompts), data.prompts_per_class)
    expected = {f"zeroshot/{k}": v for k, v in topk_accuracy(img, cls, data.labels).items()}
    expected |= {f"retrieval/{k}": v for k, v in recall_at_k(img, txt, data.groups, (1, 5, 10)).items()}
    expected |= {f"geometry/{k}": v for k, v in geometry(img, txt, 20.0).items()}
    assert set(out) == {f"eval/{k}" for k in expected}
    assert "eval/retrieval/median_rank_t2i" in out and "eval/geometry/modality_gap" in out
    for k, v in expected.items():
        assert abs(out[f"eval/{k}"] - v) < 1e-4, k


def test_declared_evaluators_and_bad_data(repo_root, digits_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"data: {{source: digits, path: {digits_dir}}}\nmodel: {{arch: debug}}\n"
                           "evals:\n  digits_zs: {type: zeroshot, every: 3, ks: [1, 2], max_samples: 50}\n")
    recipe = load_recipe(recipe_file)
    assert list(recipe.evals) == ["digits_zs"]  # a declared section replaces the defaults
    manifest = read_manifest(digits_dir)
    ev = Evaluators(recipe, manifest, preprocessor(recipe, manifest, train=False))
    assert len(ev.data["digits_zs"].image) == 50
    model = ContrastiveModel(recipe.model)
    assert set(ev(model, 3)) == {"eval/digits_zs/top1", "eval/digits_zs/top2"}

    with pytest.raises(ConfigError, match="evaluation data 'nowhere'.*towerlab data prepare"):
        Evaluators(load_recipe(recipe_file, ["evals.digits_zs.data=nowhere"]), manifest,
                   preprocessor(recipe, manifest, train=False))
    with pytest.raises(ConfigError, match="unknown evaluator type 'retreival'. Did you mean 'retrieval'"):
        load_recipe(recipe_file, ["evals.digits_zs.type=retreival"])
    with pytest.raises(ConfigError, match="unknown key 'evals.digits_zs.evry'. Did you mean 'every'"):
        load_recipe(recipe_file, ["evals.digits_zs.evry=3"])


def test_geometry_plot_logged_to_mlflow(setup, tmp_path):
    recipe, evaluators, model = setup
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowRun.start(uri, "plots", "plot-test", {}, {})
    for step in (6, 12):
        run.log_metrics(evaluators(model, step), step)
    paths = evaluators.log_plots(run)
    assert paths == ["plots/geometry_geometry.png"]
    local = MlflowClient(uri).download_artifacts(run.run_id, paths[0], str(tmp_path))
    with open(local, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(local).size[0] > 500
