"""Foreign WebDataset shards (img2dataset's layout, with a corrupt image, a sample without a caption and an
unreadable shard) end to end on the real stack: Ray Data reading the shards in place on its workers, and
`towerlab train` from them with CLIP's BPE and no evaluators, dirty samples skipped and counted in MLflow; with
data.bad_shards=error the unreadable shard stops the run, named."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from .conftest import run_cli

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]

BPE = ["model.text.tokenizer=clip_bpe", "model.text.vocab_size=49408"]
KEYS = ["jpg", "jpeg", "png", "webp"]


def test_ray_data_reads_foreign_shards_and_the_preprocessor_drops_dirty_samples(tmp_path, make_wds_shards,
                                                                                ray_cluster):
    from towerlab.data.foreign import read_shard, shard_manifest
    from towerlab.data.pipeline import train_dataset
    from towerlab.train.ray_env import init_ray
    from towerlab.train.recipe import load_recipe

    shards = make_wds_shards(tmp_path / "laion", shards=3, per_shard=8)
    recipe = load_recipe(None, ["data.source=webdataset", f"data.path={shards['root']}", "data.bad_shards=skip",
                                *BPE, "evals={}", "data.global_batch=4"])
    manifest = shard_manifest(recipe.data)
    # what the shards hold, read here in this process: every raw row (dirty ones and the unreadable shard's marker)
    raw = [r for f in manifest.files("train")
           for r in read_shard(manifest.loc.fs, f, KEYS, "txt", bad_shards="skip")]
    usable = [r for r in raw if not r["problem"] and decodes(r["image"])]  # not the corrupt image
    init_ray(4)
    rows = train_dataset(recipe, manifest).dataset.take_all()
    assert len(rows) == len(usable) >= shards["good"]
    assert sum(int(r["skipped"]) for r in rows) == len(raw) - len(rows)


def test_train_from_img2dataset_shards(repo_root, tmp_path, make_wds_shards, ray_cluster, mlflow_server):
    shards = make_wds_shards(tmp_path / "laion", shards=4, per_shard=16)
    client = MlflowClient(mlflow_server)
    common = [str(repo_root / "recipes" / "debug.yaml"), "data.source=webdataset", f"data.path={shards['root']}",
              *BPE, "evals={}", "data.global_batch=16", "train.steps=4", "train.log_every=2",
              "train.checkpoint_every=4"]
    flags = ["--no-progress", "--tracking-uri", mlflow_server]  # after the overrides (argparse)
    train = run_cli(["train", *common, "name=wds-foreign", "data.bad_shards=skip", *flags], cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "5 WebDataset shard(s), 80 samples (from img2dataset's _stats.json files)" in train.stdout
    exp = client.get_experiment_by_name("towerlab")
    (run,) = client.search_runs([exp.experiment_id], "tags.`towerlab.run_name` = 'wds-foreign'")
    assert run.info.status == "FINISHED"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert run.data.metrics["data/skipped_samples_epoch"] >= 1

    bad = run_cli(["train", *common, "name=wds-foreign-bad", *flags], cwd=tmp_path)
    assert bad.returncode != 0
    assert f"shard {shards['bad_tar']} cannot be read" in bad.stdout + bad.stderr

    # a weighted mixture of two clean corpora, shards drawn with replacement, a third of the shards held out and
    # evaluated (retrieval: web data has no class labels)
    a = make_wds_shards(tmp_path / "a", shards=3, per_shard=16, dirty=False, corrupt_shard=False)
    b = make_wds_shards(tmp_path / "b", shards=3, per_shard=16, seed=1, dirty=False, corrupt_shard=False)
    mix = run_cli(["train", str(repo_root / "recipes" / "debug.yaml"), "data.source=webdataset", "data.path=null",
                   f"data.sources=[{{path: {a['root']}, weight: 1}}, {{path: {b['root']}, weight: 3}}]",
                   "data.resampled=true", "data.heldout_shards=0.34", *BPE,
                   "evals={retrieval: {type: retrieval, data: heldout}}", "data.global_batch=16", "train.steps=4",
                   "train.log_every=2", "train.checkpoint_every=4", "eval.every=4", "name=wds-mixture", *flags],
                  cwd=tmp_path)
    assert mix.returncode == 0, mix.stdout[-3000:] + mix.stderr[-3000:]
    assert "a mixture of 2 WebDataset corpora, 6 shard(s), 96 samples" in mix.stdout
    (run,) = client.search_runs([exp.experiment_id], "tags.`towerlab.run_name` = 'wds-mixture'")
    assert run.info.status == "FINISHED"
    assert all(math.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert "eval/retrieval/recall_at_1_i2t" in run.data.metrics  # the held-out shards were evaluated
    mixture = json.loads(open(client.download_artifacts(run.info.run_id, "data_mixture.json", str(tmp_path))).read())
    assert [(c["weight"], round(c["share"], 2), c["samples"]) for c in mixture] == [(1, 0.25, 48), (3, 0.75, 48)]
    assert sum(c["heldout_samples"] for c in mixture) == 32  # 2 of 6 shards of 16


def decodes(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).convert("RGB")
        return True
    except Exception:
        return False
