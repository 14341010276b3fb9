"""A unit-test helper: a sweep recorded in a real MLflow store (sqlite, one per test module), shaped like
`towerlab sweep` records one: a parent run with the sweep's params and tags, one child per trial with the flattened
recipe as params, the trial tags, and metric histories. Replicates share a `towerlab.config` tag. A second sweep,
"old", predates that tag. `sweep_store` returns the URI and what was logged."""

from __future__ import annotations

import json

import pytest

from towerlab.tracking import tags as T

METRIC = "eval/zeroshot/top1"
STEPS = [10, 20, 30]
# configuration -> (loss, temperature, batch, final values over seeds, status)
CONFIGS = {
    "clip-0.07-32": ("clip", 0.07, 32, [0.90, 0.91, 0.92], "FINISHED"),  # the best
    "siglip-0.07-32": ("siglip", 0.07, 32, [0.89, 0.915, 0.905], "FINISHED"),  # tied with the best
    "clip-0.2-32": ("clip", 0.2, 32, [0.50, 0.52, 0.51], "FINISHED"),  # clearly worse
    "siglip-0.2-128": ("siglip", 0.2, 128, [0.40, 0.42], "KILLED"),  # cut at step 20 while rising
    "dcl-0.2-128": ("dcl", 0.2, 128, [0.30, 0.29], "KILLED"),  # cut at step 30 of its 40, flat
    "clip-0.2-128": ("clip", 0.2, 128, [0.60, 0.62], "KILLED"),  # rising, but KILLED at its last step (train.steps)
}


def _history(config: str, final: float) -> list[tuple[int, float]]:
    if config.startswith("siglip-0.2"):
        return [(10, final / 2), (20, final)]
    if config.startswith("dcl"):
        return [(10, final), (20, final + 0.01), (30, final)]  # its train.steps is 40: cut before the end
    return [(s, final * s / STEPS[-1]) for s in STEPS]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("sweep")  # one store per test module: creating it takes seconds
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("towerlab")
    parent = client.create_run(exp, tags={T.SWEEP: "study", T.ROLE: "sweep"}, run_name="sweep study").info.run_id
    for k, v in {"space.loss.name": json.dumps({"choice": ["clip", "siglip", "dcl"]}),
                 "space.loss.temperature_init": json.dumps({"choice": [0.07, 0.2]}),
                 "space.data.global_batch": json.dumps({"choice": [32, 128]}),
                 "metric": METRIC, "mode": "max", "search.seeds": "3"}.items():
        client.log_param(parent, k, v)
    runs: dict[str, list[str]] = {}
    trial = 0
    for config, (loss, temp, batch, finals, status) in CONFIGS.items():
        for seed, final in enumerate(finals):
            trial += 1
            rid = client.create_run(exp, run_name=f"{loss} t={temp} b={batch} s={seed}", tags={
                "mlflow.parentRunId": parent, T.ROLE: "trial", T.SWEEP: "study", T.TRIAL_ID: f"t{trial:05d}",
                T.CONFIG: config, T.SEED: str(seed)}).info.run_id
            for k, v in {"loss.name": loss, "loss.temperature_init": temp, "data.global_batch": batch,
                         "seed": seed, "train.steps": 40 if loss == "dcl" else STEPS[-1]}.items():
                client.log_param(rid, k, str(v))
            for step, value in _history(config, final):
                client.log_metric(rid, METRIC, value, step=step)
                client.log_metric(rid, "train/loss", 2.0 - value, step=step)
            client.log_metric(rid, "eval/zeroshot/modality_gap", 1.0 - final / 2, step=30)
            client.log_metric(rid, "eval/zeroshot/effective_rank_image", 10 * final, step=30)
            client.set_terminated(rid, status)
            runs.setdefault(config, []).append(rid)
    failed = client.create_run(exp, run_name="broken", tags={"mlflow.parentRunId": parent, T.ROLE: "trial"})
    client.set_terminated(failed.info.run_id, "FAILED")
    silent = client.create_run(exp, run_name="no metric", tags={"mlflow.parentRunId": parent, T.ROLE: "trial"})
    client.set_terminated(silent.info.run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    # a sweep from before the config and seed tags: two runs of the same values, each its own configuration
    old = client.create_run(exp, tags={T.SWEEP: "old", T.ROLE: "sweep"}, run_name="sweep old").info.run_id
    client.log_param(old, "space.loss.name", json.dumps({"choice": ["clip"]}))
    for i, value in enumerate([0.5, 0.6]):
        rid = client.create_run(exp, run_name=f"old {i}", tags={"mlflow.parentRunId": old, T.ROLE: "trial"}).info.run_id
        client.log_param(rid, "loss.name", "clip")
        client.log_metric(rid, METRIC, value, step=10)
        client.set_terminated(rid, "FINISHED")
    return {"uri": uri, "client": client, "parent": parent, "exp": exp, "runs": runs, "tmp": tmp_path}
