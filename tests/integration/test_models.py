"""A checkpoint that travels, through the whole stack: a tiny random CLIPModel saved by transformers is imported
(`model.pretrained=hf:`), trained 2 steps by Ray Train + DeepSpeed (ZeRO-2 and ZeRO-3) with a real MLflow server,
logged as MLflow LoggedModels (last and best), exported with `towerlab export --format hf`, and read back by
transformers' CLIPModel with the embeddings towerlab computes from the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from .conftest import run_cli

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]

TEXTS = ["a photo of the digit 7", "3", "digit"]


def _hf_features(folder, images, texts):
    from transformers import AutoTokenizer, CLIPModel

    hf = CLIPModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", max_length=hf.config.text_config
                                                   .max_position_embeddings, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=images)
        text = hf.get_text_features(input_ids=tokens["input_ids"])
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor
    pooled = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text)]
    return *pooled, tokens["input_ids"]


@pytest.mark.parametrize("stage", [2, 3])
def test_imported_clip_trains_is_logged_and_exports_to_transformers(repo_root, tmp_path, ray_cluster, mlflow_server,
                                                                     stage):
    from towerlab.train.checkpoint import load_model, resolve_target

    env = {"HF_HUB_OFFLINE": "1"}
    made = run_cli(["recipes", "tiny-clip", "models/tiny-clip"], cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    name = f"clip_ft_zero{stage}"
    out = run_cli(["train", str(repo_root / "recipes" / "digits_clip_finetune.yaml"), "preset=smoke", f"name={name}",
                   "model.freeze=[]", f"train.zero_stage={stage}", "train.steps=2", "data.global_batch=32",
                   "train.checkpoint_every=1", "eval.every=1", "train.log_every=1", "optim.warmup_steps=1",
                   "--no-progress", "--tracking-uri", mlflow_server], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("towerlab").experiment_id
    run, = client.search_runs([exp], f"tags.`towerlab.run_name` = '{name}'")
    assert run.info.status == "FINISHED"
    models = [m for m in client.search_logged_models([exp]) if m.source_run_id == run.info.run_id]
    roles = {r: m for m in models for r in m.tags["towerlab.role"].split(",")}
    assert set(roles) == {"last", "best"}, out.stderr[-3000:]
    assert roles["last"].tags["towerlab.step"] == "2"
    assert roles["last"].params["format"] == "hf"  # a Hugging Face tokenizer: it goes back to transformers

    exported = run_cli(["export", f"results/{name}", "--format", "hf", "--out", "exported"], cwd=tmp_path, env=env)
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]

    target = resolve_target(str(tmp_path / "results" / name), mlflow_server)
    model, step = load_model(target.checkpoint, target.recipe)
    assert step == 2
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hf_image, hf_text, tokens = _hf_features(tmp_path / "exported", images, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(hf_image, model.towers["image"](images), atol=1e-5, rtol=0)
        torch.testing.assert_close(hf_text, model.towers["text"](tokens), atol=1e-5, rtol=0)

    # the logged model is the same model: downloaded from MLflow, transformers computes the same features
    import mlflow.artifacts

    folder = mlflow.artifacts.download_artifacts(artifact_uri=roles["last"].artifact_location,
                                                 dst_path=str(tmp_path / "logged"), tracking_uri=mlflow_server)
    logged_image, logged_text, _ = _hf_features(folder, images, TEXTS)
    torch.testing.assert_close(logged_image, hf_image, atol=0, rtol=0)
    torch.testing.assert_close(logged_text, hf_text, atol=0, rtol=0)
