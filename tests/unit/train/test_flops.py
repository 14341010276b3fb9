"""The FLOP count behind `towerlab plan`'s expected step time, against a hand computation for a small ViT, and
the MFU assumption replaced by the device check's measurement."""

from __future__ import annotations

import json

import pytest

from towerlab.cli import main
from towerlab.config import ConfigError
from towerlab.train.flops import ASSUMED_MFU, estimate_step, peak_tflops, tower_flops
from towerlab.train.recipe import load_recipe

SMALL_VIT = ["model.vision.image_size=8", "model.vision.patch_size=4", "model.vision.channels=3",
             "model.vision.width=8", "model.vision.layers=1", "model.vision.heads=2", "model.vision.mlp_ratio=4",
             "model.embed_dim=4"]


def hand_vit_flops(keep: int) -> int:
    """Forward+backward FLOPs (2 per multiply-add) of one sample through the small ViT, written out by hand: 4
    patches of 3x4x4 pixels, width 8, one block, MLP 32, `keep` patches after patch dropout plus the class token.
    Backward is twice the forward for every product whose input needs a gradient; the patch embedding's input
    (the image) does not, so its backward is only the weight gradient (once its forward)."""
    s = keep + 1
    conv = 2 * 4 * (3 * 4 * 4) * 8
    qkv = 2 * s * 8 * (3 * 8)
    attention = 2 * (2 * s * s * 8)  # scores q k^T and their product with v, all heads (heads x head_dim = 8)
    out_proj = 2 * s * 8 * 8
    mlp = 2 * (2 * s * 8 * 32)
    proj = 2 * 8 * 4  # the class token's projection to the shared space
    return 2 * conv + 3 * (qkv + attention + out_proj + mlp + proj)


@pytest.mark.parametrize("drop,keep", [(0.0, 4), (0.5, 2)])
def test_vit_flops_equal_the_hand_count(repo_root, drop, keep):
    r = load_recipe(repo_root / "recipes" / "debug.yaml", [*SMALL_VIT, f"model.vision.patch_dropout={drop}"])
    assert tower_flops(r)["image"] == hand_vit_flops(keep)
    assert hand_vit_flops(4) == 31776  # the arithmetic above, stated once as a number


def test_step_estimate_and_measured_mfu(repo_root, tmp_path):
    r = load_recipe(repo_root / "recipes" / "debug.yaml", ["train.workers=2", "data.global_batch=64"])
    est = estimate_step(r, gpu="NVIDIA H100 80GB HBM3", measured=tmp_path / "none.json")
    per = tower_flops(r)
    d = r.model.embed_dim
    assert est.peak_tflops == 989.0 and est.mfu == ASSUMED_MFU
    assert est.flops_per_worker == pytest.approx(32 * sum(per.values()) + 2 * 3 * 2 * 32 * 64 * d)
    fast, slow = est.seconds
    assert fast == pytest.approx(est.flops_per_worker / (989e12 * 0.55))
    assert slow == pytest.approx(est.flops_per_worker / (989e12 * 0.35))

    results = tmp_path / "device_check.json"
    results.write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "vit_b32": {"runs": [
        {"key": "compile=false,patch_dropout=False", "mfu": 0.41}]}}))
    measured = estimate_step(r, gpu="H100", measured=results)
    assert measured.mfu == (0.41, 0.41) and "measured" in measured.mfu_source
    assert estimate_step(r, gpu="A100", measured=results).mfu == ASSUMED_MFU  # another GPU: not its measurement


def test_peak_lookup():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    with pytest.raises(ConfigError, match="--peak-tflops"):
        peak_tflops("Quadro 4000")


def test_plan_prints_the_expected_step_time(repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert main(["plan", "recipes/debug.yaml", "--gpu", "A100"]) == 0
    out = capsys.readouterr().out
    assert "expected step time on 2 x A100 (bf16 peak 312 TFLOP/s) at MFU 35%-55%" in out
    assert main(["plan", "recipes/debug.yaml", "--gpu", "Quadro 4000"]) == 2
    assert "error: --gpu 'Quadro 4000'" in capsys.readouterr().err


def test_pretrained_tower_is_counted_on_the_cpu(repo_root):
    """A Hugging Face tower reads mask values while it runs (meta tensors have none): counted on the CPU from its
    configuration; MiniLM-L6 (22M parameters, 6 layers of width 384) over the recipe's context costs more than the
    projection alone and less than 6 x parameters x tokens would bound it."""
    r = load_recipe(repo_root / "recipes" / "digits_lit_minilm.yaml")
    flops = tower_flops(r)
    tokens = r.model.text.context_length
    assert 2 * 384 * r.model.embed_dim < flops["text"] < 6 * 23e6 * tokens
    assert flops["image"] > 0
