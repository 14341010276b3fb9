"""Worker failure under ZeRO-3: the large-batch recipe's smoke preset (tiny towers, ZeRO-3 built under zero.Init,
tiled loss, per-block checkpointing, feature cache) on a real Ray cluster with a real MLflow server. One Ray Train
worker process is SIGKILLed (os.kill) after the first checkpoint; the run restarts from its latest checkpoint
(FailureConfig max_failures from the recipe), finishes, stays one MLflow run whose step axis continues, redoes at
most one checkpoint interval, and exports the consolidated fp32 weights (zero_to_fp32) as an artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from mlflow import MlflowClient

from .conftest import BIN, stop_group

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 12, 4


def _train_workers(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False, timeout=15)
    return [a.pid for a in actors if a.pid]


def _registered_checkpoint(run_dir) -> bool:
    """Whether Ray Train's controller has registered a checkpoint (a directory on disk alone is not enough: a worker
    killed before the controller collects the report restarts from scratch)."""
    import json

    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snap.read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError):
        return False


def test_killed_worker_resumes_from_checkpoint(repo_root, tmp_path, ray_cluster, mlflow_server):
    name = "killtest"
    cmd = [str(BIN / "towerlab"), "train", str(repo_root / "recipes" / "pretrain_g14_large_batch.yaml"), "preset=smoke",
           f"name={name}", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
           f"eval.every={STEPS}", "train.export_fp32=true", "--no-progress", "--tracking-uri", mlflow_server]
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "results" / name
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if _registered_checkpoint(run_dir):
                pids = _train_workers(ray_cluster["dashboard"])
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed_at = time.time() * 1000
                    break
            time.sleep(0.2)
        assert killed_at is not None, "no checkpoint and live worker to kill: " + (tmp_path / "train.log").read_text()[-3000:]
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            stop_group(proc)
        log.close()
    out = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, out[-4000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("towerlab")
    runs = client.search_runs([exp.experiment_id], f"tags.`towerlab.run_name` = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, continued after the restart
    run_id = runs[0].info.run_id
    restored = client.get_metric_history(run_id, "train/restored_step")
    assert len(restored) == 1, restored  # exactly one restart, from a checkpoint step
    resumed_from = int(restored[0].value)
    assert resumed_from >= EVERY and resumed_from % EVERY == 0
    losses = client.get_metric_history(run_id, "train/loss")
    steps = [m.step for m in losses]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))  # the step axis is complete and continues to the end
    before_kill = max(m.step for m in losses if m.timestamp <= killed_at)
    redone = sorted({s for s in steps if steps.count(s) > 1})
    # what was logged after the last checkpoint and before the kill is redone; nothing else, at most one interval
    assert all(resumed_from < s <= before_kill for s in redone), (resumed_from, before_kill, redone)
    assert before_kill - resumed_from <= EVERY
    # the consolidated fp32 weights: every parameter of the tiny towers, whole
    path = client.download_artifacts(run_id, "model/pytorch_model_fp32.pt", str(tmp_path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["model.logit_scale"].shape == (1,) and all(v.dtype == torch.float32 for v in state.values())
    assert sum(v.numel() for v in state.values()) == 3_181_185  # the tiny arch's parameter count
