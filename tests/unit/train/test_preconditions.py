"""Optional features whose machine preconditions are missing are refused before launch, one line naming the key
and the fix (train/preconditions.py); on a cluster (RAY_ADDRESS) the local machine is not asked."""

from __future__ import annotations

import ctypes.util

import pytest
import torch

from towerlab.config import ConfigError
from towerlab.train import preconditions
from towerlab.train.preconditions import check_preconditions, libaio_problem
from towerlab.train.recipe import load_recipe

NVME = ["train.zero_stage=3", "train.offload_optimizer=nvme", "train.offload_param=nvme"]


def test_nvme_offload_without_libaio_is_refused(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    recipe = load_recipe(None, NVME)
    with pytest.raises(ConfigError, match=r"^train.offload_optimizer=nvme needs DeepSpeed's async_io op, built against "
                                          r"libaio: libaio is not installed here.*apt-get install libaio-dev"):
        check_preconditions(recipe, {})
    check_preconditions(recipe, {"RAY_ADDRESS": "ray://head:10001"})  # the cluster's nodes decide there
    check_preconditions(load_recipe(None, []), {})  # no nvme, nothing asked


def test_libaio_needs_its_header_too(monkeypatch, tmp_path):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libaio.so.1" if name == "aio" else None)
    monkeypatch.setattr(preconditions, "HEADER_DIRS", (str(tmp_path / "none"),))
    assert "libaio.h" in libaio_problem({})
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "libaio.h").write_text("")
    assert libaio_problem({"CPATH": str(tmp_path / "inc")}) is None
    check_preconditions(load_recipe(None, NVME), {"CPATH": str(tmp_path / "inc")})


def test_use_gpu_without_a_gpu_is_refused_locally(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_recipe(None, ["train.use_gpu=true"])
    with pytest.raises(ConfigError, match=r"^train.use_gpu=true but torch sees no GPU here.*train.use_gpu=false"):
        check_preconditions(recipe, {})
    check_preconditions(recipe, {"RAY_ADDRESS": "ray://head:10001"})


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    for precision in ("auto", "bf16"):
        recipe = load_recipe(None, ["train.use_gpu=true", f"train.precision={precision}"])
        with pytest.raises(ConfigError, match=rf"^train.precision={precision} means bf16 on a GPU, which Tesla V100 "
                                              r"does not support: set train.precision=fp32"):
            check_preconditions(recipe, {})
    check_preconditions(load_recipe(None, ["train.use_gpu=true", "train.precision=fp32"]), {})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    check_preconditions(load_recipe(None, ["train.use_gpu=true"]), {})
