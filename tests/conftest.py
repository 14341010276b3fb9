"""Shared fixtures. The Ray and MLflow fixtures start real processes on 127.0.0.1 once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from towerlab.data import prepare

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare("digits", out, shards=4)
    return out
