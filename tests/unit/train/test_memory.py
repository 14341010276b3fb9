"""The planner: model-state bytes against DeepSpeed's own estimators, activation and loss bytes against worked
examples, the refusal in `towerlab train` (before any process starts), `towerlab plan` and recipe presets."""

from __future__ import annotations

import pytest

from towerlab.cli import main
from towerlab.config import ConfigError
from towerlab.train.memory import (
    activation_bytes, count_params, loss_bytes, model_states, parse_bytes, plan_memory,
)
from towerlab.train.recipe import load_recipe


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 << 30 and parse_bytes("24 GB") == 24 * 10**9 and parse_bytes("512MiB") == 1 << 29
    with pytest.raises(ConfigError, match="train.device_memory='80 gigs' is not a memory size"):
        parse_bytes("80 gigs")


def test_bf16_model_states_agree_with_deepspeed_estimators(repo_root):
    """Our per-stage breakdown and DeepSpeed's estimate_zero2/zero3 (independent code) agree for bf16 on GPUs."""
    r = load_recipe(repo_root / "recipes" / "pretrain_g14_large_batch.yaml")
    params, largest = count_params(r)
    assert params == 1_366_678_273  # OpenCLIP's ViT-g-14 total (+ nothing: CLIP's loss has no parameters)
    for stage in (2, 3):
        s = model_states(r, params, largest, stage, world=32)
        own = s.params + s.grads + s.optimizer
        assert s.deepspeed is not None and abs(own - s.deepspeed) / s.deepspeed < 0.15, (stage, own, s.deepspeed)
    # stage 2 without offload is exactly DeepSpeed's 2P + 18P/W
    s2 = model_states(r, params, largest, 2, world=32)
    assert s2.deepspeed == pytest.approx(2 * params + 18 * params / 32, rel=1e-9)


def test_fp32_stages_partition_as_zero_does(repo_root):
    r = load_recipe(repo_root / "recipes" / "debug.yaml")
    P, W = 1000, 4
    by = [model_states(r, P, 10, s, W) for s in range(4)]
    assert [(b.params, b.grads, b.optimizer) for b in by] == [
        (4 * P, 4 * P, 8 * P), (4 * P, 4 * P, 12 * P / W), (4 * P, 4 * P / W, 12 * P / W),
        (4 * P / W, 4 * P / W, 8 * P / W)]  # ZeRO-3: the fp32 master is the parameter partition
    r.train.zero_stage, r.train.offload_optimizer, r.train.sub_group_size = 3, "nvme", 10
    nvme = model_states(r, P, 10, 3, W)
    assert nvme.offloaded == 12 * P / W and nvme.optimizer == 16 * 10  # one sub-group's buffer stays in RAM


def test_activation_and_loss_bytes_worked_example(repo_root):
    r = load_recipe(repo_root / "recipes" / "debug.yaml", ["data.global_batch=8", "train.workers=2"])
    # debug: vision 8x8 / patch 4 -> 5 tokens, width 32, 1 layer, 2 heads, mlp 2; text 12 tokens, width 32, ...
    vis = 5 * 32 * (8 + 4) + 2 * 5 * 5
    txt = 12 * 32 * (8 + 4) + 2 * 12 * 12
    assert activation_bytes(r, 3, checkpointed=False) == 3 * 4 * (vis + txt)
    assert activation_bytes(r, 3, checkpointed=True) == 3 * 4 * (5 * 32 + vis + 12 * 32 + txt)
    plan = plan_memory(r)
    feats = 2 * 8 * 16 * 4 * 2  # gathered image+text features and their gradients, fp32
    assert loss_bytes(r, plan.batch, tiled=False) == feats + 2 * 3 * 4 * 8 * 4  # 4 local rows x 8, 2 directions
    r.loss.tile_size = 2
    assert loss_bytes(r, plan.batch, tiled=True) == feats + 2 * 3 * 2 * 2 * 4


def test_train_refuses_what_cannot_fit_before_anything_starts(repo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(repo_root / "recipes" / "debug.yaml"), "train.device_memory=100KiB",
                 "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot fit: per worker" in err and "ZeRO-2 model states" in err and "100.00 KiB" not in err
    assert "> 0.10 MiB (train.device_memory=100KiB)" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()


def test_plan_cli_large_recipe_on_32_gpus(repo_root, capsys):
    code = main(["plan", str(repo_root / "recipes" / "pretrain_g14_large_batch.yaml"), "--workers", "32",
                 "--gpu-memory", "80GiB"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert "ViT-g-14, 1,366,678,273 parameters" in out and "global 32,768 = micro-batch 128 x accumulation 8 x 32 workers" in out
    assert "image -> text: 32,767 per sample per step" in out and ": fits" in out
    # the same plan on 24 GiB GPUs without checkpointing cannot fit: exit 1
    assert main(["plan", str(repo_root / "recipes" / "pretrain_g14_large_batch.yaml"), "model.grad_checkpointing=false",
                 "--workers", "32", "--gpu-memory", "24GiB"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_smoke_preset(repo_root):
    path = repo_root / "recipes" / "pretrain_g14_large_batch.yaml"
    r = load_recipe(path, ["preset=smoke", "train.steps=3"])
    assert r.model.arch == "tiny" and r.train.workers == 2 and not r.train.use_gpu and r.train.steps == 3
    assert r.train.zero_stage == 3 and r.loss.tiled and r.model.grad_checkpointing and r.data.source == "synthetic"
    with pytest.raises(ConfigError, match="has no preset 'smok'. Did you mean 'smoke'"):
        load_recipe(path, ["preset=smok"])


@pytest.mark.parametrize("overrides, message", [
    (["train.offload_optimizer=disk"], "train.offload_optimizer='disk' is not allowed. Use one of: none, cpu, nvme"),
    (["train.offload_param=cpu"], "train.offload_param=cpu needs train.zero_stage=3"),
    (["train.zero_stage=0", "train.offload_optimizer=cpu"], "needs train.zero_stage >= 1"),
    (["train.device_memory=lots"], "train.device_memory='lots' is not a memory size"),
    (["train.zero_stage=0", "train.export_fp32=true"], "train.export_fp32 consolidates ZeRO shards"),
])
def test_scale_settings_are_checked(repo_root, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(repo_root / "recipes" / "debug.yaml", overrides)


def test_zero3_offload_config(repo_root):
    from towerlab.train.deepspeed_config import deepspeed_config

    r = load_recipe(repo_root / "recipes" / "debug.yaml", ["train.zero_stage=3", "train.offload_optimizer=nvme",
                                                             "train.nvme_path=/tmp/x", "train.sub_group_size=50000000"])
    cfg = deepspeed_config(r, plan_memory(r).batch)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["sub_group_size"] == 50_000_000 and z["stage3_param_persistence_threshold"] >= 1
    assert z["offload_optimizer"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/tmp/x"}
    assert "aio" in cfg and "offload_param" not in z and "bf16" not in cfg  # fp32 on CPU
