"""Bring-your-own data end to end on the real stack (ray start cluster, Ray Data, Ray Train + DeepSpeed, MLflow):

- a folder of PNG and JPEG files written here, with CSV and JSONL captions, prepared with the CLI as Parquet and as
  WebDataset shards, and the debug recipe trained from each (the WebDataset run with two captions per image as
  positives of the decoupled softmax, colour jitter and token masking on); a corrupted Parquet shard stops a run
  before it starts;
- epoch semantics over 2 Ray Train workers and an uneven number of shards, in each format, streamed by Ray Data's
  own reader (read_parquet, read_webdataset: the path of datasets too large for the driver to read): every sample
  exactly once per epoch across the workers, a new order every epoch, and an epoch started at a batch offset.
"""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from .conftest import run_cli

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


def test_prepare_and_train_from_image_folder(repo_root, tmp_path, make_image_folder, ray_cluster, mlflow_server):
    src = make_image_folder(tmp_path / "src", n=80)
    client = MlflowClient(mlflow_server)
    runs = {"parquet": ("csv", ["loss.name=clip"]),
            "webdataset": ("jsonl", ["loss.name=decoupled_softmax", "data.captions_per_image=2",
                                     "data.augment.colour_jitter=true", "data.augment.token_mask=true"])}
    for fmt, (captions, extra) in runs.items():
        out = tmp_path / f"data-{fmt}"
        prep = run_cli(["data", "prepare", "images", "--images", str(src["images"]), "--captions",
                        str(src[captions]), "--out", str(out), "--format", fmt, "--shard-size", "25"], cwd=tmp_path)
        assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"] == {"train": 72, "heldout": 8} and len(manifest["splits"]["train"]) == 3
        train = run_cli(["train", str(repo_root / "recipes" / "debug.yaml"), f"name=byod-{fmt}",
                         f"data.source={fmt}", f"data.path={out}", "data.global_batch=16", "train.steps=4",
                         "train.log_every=2", "train.checkpoint_every=4", "eval.every=4", *extra, "--no-progress",
                         "--tracking-uri", mlflow_server], cwd=tmp_path)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        exp = client.get_experiment_by_name("towerlab")
        (run,) = client.search_runs([exp.experiment_id], f"tags.`towerlab.run_name` = 'byod-{fmt}'")
        assert run.info.status == "FINISHED"
        assert run.data.tags["towerlab.data_fingerprint"] == manifest["fingerprint"]
        assert run.data.params["data.source"] == fmt
        losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
        assert 0 <= run.data.metrics["eval/zeroshot/top1"] <= 1  # 4 classes from the label column

    # a shard corrupted after preparing: with checksum verification on (opt-in), the run stops before Ray starts,
    # naming it, exit 2
    shard = tmp_path / "data-parquet" / "train" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    bad = run_cli(["train", str(repo_root / "recipes" / "debug.yaml"), "name=byod-bad", "data.source=parquet",
                   f"data.path={tmp_path / 'data-parquet'}", "data.verify_shards=true", "--no-progress",
                   "--tracking-uri", mlflow_server],
                  cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert "part-00001.parquet does not match its checksum" in bad.stderr and "data.bad_shards=skip" in bad.stderr


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_epochs_on_two_workers_see_every_sample_once(tmp_path, make_image_folder, ray_cluster, monkeypatch, fmt):
    import ray.train
    from ray.train.torch import TorchTrainer

    from towerlab.data.folder import prepare_images
    from towerlab.data.pipeline import train_dataset
    from towerlab.train.ray_env import init_ray
    from towerlab.train.recipe import load_recipe

    src = make_image_folder(tmp_path / "src", n=60)
    # 60 records, 10% held out -> 54 train rows in 3 shards of 20, 20, 14 (an uneven number, uneven sizes)
    manifest, _ = prepare_images(src["images"], src["csv"], tmp_path / "data", fmt=fmt, shard_size=20)
    assert [e["rows"] for e in manifest.data["splits"]["train"]] == [20, 20, 14]
    train_ids = sorted(split_ids(manifest))
    monkeypatch.setattr("towerlab.data.pipeline.CACHE_RAW_BYTES", 0)  # streamed, not read by the driver
    recipe = load_recipe(None, [f"data.source={fmt}", f"data.path={tmp_path / 'data'}", "data.shuffle_buffer=16",
                                "data.global_batch=6", "seed=3"])
    out_dir = tmp_path / "seen"
    out_dir.mkdir()

    def loop(config):
        import json as _json

        import ray.train as rt

        from towerlab.data.pipeline import epoch_batches

        ctx = rt.get_context()
        shard = rt.get_dataset_shard("train")
        seen = {}
        for epoch in range(2):
            seen[epoch] = [int(i) for b in epoch_batches(shard, config["recipe"], 3, epoch) for i in b["id"]]
        seen["offset"] = [int(i) for b in epoch_batches(shard, config["recipe"], 3, 2, skip_batches=4)
                          for i in b["id"]]
        (config["out"] / f"rank{ctx.get_world_rank()}.json").write_text(_json.dumps(seen))

    init_ray(4)
    TorchTrainer(loop, train_loop_config={"recipe": recipe, "out": out_dir},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name="epochs", storage_path=str(tmp_path / "results")),
                 datasets={"train": train_dataset(recipe, manifest).dataset}).fit()
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        both = ranks[0][epoch] + ranks[1][epoch]
        assert sorted(both) == train_ids, f"epoch {epoch}: duplicates or drops across workers"
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 27 - 27 % 3
    assert [r["0"] for r in ranks] != [r["1"] for r in ranks], "epoch 1 repeated epoch 0's order"
    # starting an epoch 4 batches in: each worker gets its remaining 5 batches of 3, no duplicates
    offset = ranks[0]["offset"] + ranks[1]["offset"]
    assert len(ranks[0]["offset"]) == len(ranks[1]["offset"]) == 15 and len(set(offset)) == 30
    assert set(offset) <= set(train_ids)


def split_ids(manifest) -> list[int]:
    from towerlab.data.pipeline import split_columns

    return split_columns(manifest, "train", ["id"])["id"]
