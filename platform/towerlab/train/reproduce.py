"""Rebuilding a run from its MLflow record alone: the resolved recipe artifact, the git commit, the data fingerprint
and the package versions that `towerlab train` logged as tags. Every difference from what is here now is reported
(the run still goes ahead: a different commit may be the very thing being tested); then the recipe is trained as a
new run that carries a `towerlab.reproduces` tag pointing at the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from towerlab.config import ConfigError, Recipe
from towerlab.tracking import tags as T
from towerlab.tracking.provenance import git_commit, versions
from towerlab.train.checkpoint import RUN_FILE, recorded_recipe
from towerlab.train.dataset import ensure_data
from towerlab.train.driver import Summary, train

VERSION_TAG = T.VERSION_PREFIX


@dataclass
class Plan:
    run_id: str
    recipe: Recipe  # the recorded recipe, renamed for the new run
    recorded_metrics: dict[str, float]
    mismatches: list[str] = field(default_factory=list)


def plan(run_id: str, uri: str, name: str | None = None) -> Plan:
    """Read the record, prepare the data, compare provenance; nothing is trained yet."""
    from mlflow import MlflowClient

    recorded = recorded_recipe(uri, run_id)
    run = MlflowClient(uri).get_run(run_id)
    tags = run.data.tags
    recipe = replace(recorded, name=name or f"{recorded.name}-repro-{run_id[:8]}")
    run_dir = Path(recipe.train.storage_path).absolute() / recipe.name
    if (run_dir / RUN_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run named '{recipe.name}': launching it again would resume it; "
                          "pass --name NEW_NAME")
    mismatches = []
    now = {"git commit": git_commit(), "data fingerprint": ensure_data(recipe).fingerprint}
    now |= {f"{k} version": v for k, v in versions().items()}
    was = {"git commit": tags.get(T.GIT_COMMIT), "data fingerprint": tags.get(T.DATA_FINGERPRINT)}
    was |= {f"{k[len(VERSION_TAG):]} version": v for k, v in tags.items() if k.startswith(VERSION_TAG)}
    for what, recorded_value in was.items():
        if recorded_value is None:
            mismatches.append(f"{what}: not recorded by run {run_id}")
        elif now.get(what) != recorded_value:
            mismatches.append(f"{what}: recorded {recorded_value}, here {now.get(what, 'unknown')}")
    return Plan(run_id, recipe, dict(run.data.metrics), mismatches)


def run(p: Plan, uri: str, on_start: Callable[[Summary], None] | None = None) -> Summary:
    return train(p.recipe, tracking_uri=uri, on_start=on_start, tags={T.REPRODUCES: p.run_id})
