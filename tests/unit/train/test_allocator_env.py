"""The glibc setting towerlab gives a local Ray for ZeRO-3 on CPU (see launch.allocator_env): set only where it
pays (ZeRO-3, CPU workers, a Ray towerlab starts), never over the user's own value."""

from __future__ import annotations

import os

import pytest

from towerlab.train.ray_env import MMAP_THRESHOLD, allocator_env
from towerlab.train.recipe import load_recipe

VAR = "MALLOC_MMAP_THRESHOLD_"


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return monkeypatch


@pytest.mark.parametrize("overrides, expected", [
    (["train.zero_stage=3"], MMAP_THRESHOLD),
    (["train.zero_stage=2"], None),
    (["train.zero_stage=0"], None),
])
def test_set_for_zero3_on_cpu_only(clean_env, repo_root, overrides, expected):
    allocator_env(load_recipe(repo_root / "recipes" / "debug.yaml", overrides))
    assert os.environ.get(VAR) == expected


def test_left_alone_on_gpu_on_a_running_cluster_and_when_set(clean_env, repo_root):
    recipe = load_recipe(repo_root / "recipes" / "debug.yaml", ["train.zero_stage=3"])
    recipe.train.use_gpu = True  # set past validation: this machine has no GPU
    allocator_env(recipe)
    assert VAR not in os.environ
    recipe.train.use_gpu = False
    clean_env.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # its processes are started already
    allocator_env(recipe)
    assert VAR not in os.environ
    clean_env.delenv("RAY_ADDRESS")
    clean_env.setenv(VAR, "65536")
    allocator_env(recipe)
    assert os.environ[VAR] == "65536"
