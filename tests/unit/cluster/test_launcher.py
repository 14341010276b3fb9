"""cluster/launcher/gpu-cluster.yaml against the cluster-launcher schema that ships inside the installed ray package
(ray/autoscaler/ray-schema.json, the one `ray up` validates with), and its image against the installed Ray."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "cluster" / "launcher" / "gpu-cluster.yaml"


def _schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _errors(config: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(_schema()).iter_errors(config)]


def test_launcher_config_is_valid():
    config = yaml.safe_load(CONFIG.read_text())
    assert _errors(config) == []
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs: defaults filled in, then checked
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["head_node_type"] in config["available_node_types"]
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands",
                                                                      "worker_start_ray_commands"))
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(max_worker=c.pop("max_workers")), "'max_worker' was unexpected"),
    (lambda c: c["docker"].update(imagee=c["docker"].pop("image")), "'imagee' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_8x_a100"]["resources"].update(GPU="8"), "'8' is not of type"),
    (lambda c: c.pop("provider"), "'provider' is a required property"),
], ids=["top-level typo", "docker typo", "wrong type", "missing provider"])
def test_launcher_mistakes_are_caught(mutate, message):
    config = yaml.safe_load(CONFIG.read_text())
    mutate(config)
    assert any(message in e for e in _errors(config)), _errors(config)
