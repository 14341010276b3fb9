"""`towerlab eval` and `towerlab reproduce` on bad input: one line naming the thing and the fix, exit 2; and `towerlab
eval` on model directories (a transformers CLIPModel folder and its OpenCLIP export)."""

import pytest

from towerlab.cli import main


@pytest.mark.parametrize("args, expected", [
    (["eval", "no-such-run"], "'no-such-run' is neither a directory (checkpoint or run) nor an MLflow run id"),
    (["eval", "0123456789abcdef0123456789abcdef", "--tracking-uri", "sqlite:///{tmp}/m.db"],
     "no MLflow run '0123456789abcdef0123456789abcdef'"),
    (["eval", "{tmp}"], "neither a checkpoint directory (with ds/) nor a run directory (with towerlab_run.json)"),
    (["reproduce", "0123456789abcdef0123456789abcdef", "--tracking-uri", "http://127.0.0.1:9"],
     "is unreachable"),
])
def test_bad_targets_are_one_line(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert expected in err and "Traceback" not in err


def test_run_dir_without_checkpoints(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "towerlab_run.json").write_text('{"mlflow_run_id": "x"}')
    assert main(["eval", str(tmp_path / "r")]) == 2
    assert "no checkpoint yet" in capsys.readouterr().err


def test_eval_on_model_directories(tmp_path, digits_dir, monkeypatch):
    """`towerlab eval` on a public-style checkpoint without training it: a transformers CLIPModel directory, and
    its OpenCLIP export (tokenizer beside it), give the same metrics: the same weights, tokens and pixels."""
    import json

    from clip_testing import save_clip

    from towerlab.train.export import export_model
    from towerlab.train.recipe import load_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_clip(tmp_path / "clip")
    recipe = load_recipe(None, [f"model.pretrained=hf:{tmp_path / 'clip'}"])
    from towerlab.models import ContrastiveModel

    export_model(ContrastiveModel(recipe.model), recipe, "open_clip", tmp_path / "oc")
    results = {}
    for name in ("clip", "oc"):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(tmp_path / name), f"data.path={digits_dir}", "evals.zeroshot.max_samples=64",
                     "evals.retrieval.max_samples=64", "evals.geometry.max_samples=64", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())["metrics"]
    assert "eval/zeroshot/top1" in results["clip"] and "eval/retrieval/recall_at_1_i2t" in results["clip"]
    assert results["clip"].keys() == results["oc"].keys()
    for k, v in results["clip"].items():
        assert abs(v - results["oc"][k]) < 1e-4, k


def test_eval_overrides_are_for_models_only(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "towerlab_run.json").write_text("{}")
    (tmp_path / "r" / "checkpoint_1" / "ds").mkdir(parents=True)
    assert main(["eval", str(tmp_path / "r" / "checkpoint_1"), "data.global_batch=8"]) == 2
    assert "--recipe and overrides apply to a model directory" in capsys.readouterr().err
