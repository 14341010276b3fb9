"""Stopping and losing drivers, end to end (real `ray start` cluster, real `mlflow server`): SIGTERM of `towerlab
train` and of `towerlab sweep` mid-run ends every MLflow run they opened KILLED (a sweep's parent and its open
children) before the process exits with 128 + 15 and one line; a driver killed with SIGKILL leaves its run RUNNING,
and `towerlab runs doctor --fix` recognises it by its stopped heartbeat and closes it FAILED with the reason."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from mlflow import MlflowClient

from .conftest import BIN, run_cli, stop_group

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


def _launch(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "towerlab"), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _runs(client, flt: str):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, flt) if exps else []


def _wait_for_metric(client, proc, flt: str, timeout: float = 600):
    """The runs matching `flt` once one of them has logged train/loss (the workers are training)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        runs = _runs(client, flt)
        if any("train/loss" in r.data.metrics for r in runs):
            return runs
    out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    raise AssertionError(f"no run matching {flt} logged train/loss: {out[-2000:]} {err[-3000:]}")


def _train_args(repo_root, name, server):
    # long enough to be mid-run when signalled; checkpoints rarely (a checkpoint is not what is tested)
    return ["train", str(repo_root / "recipes" / "debug.yaml"), f"name={name}", "train.steps=100000",
            "train.log_every=1", "eval.every=100000", "train.checkpoint_every=100000", "--no-progress",
            "--tracking-uri", server]


def test_sigterm_ends_a_training_run_killed(repo_root, tmp_path, ray_cluster, mlflow_server):
    client = MlflowClient(mlflow_server)
    proc = _launch(_train_args(repo_root, "stopme", mlflow_server), tmp_path)
    try:
        (run,) = _wait_for_metric(client, proc, "tags.`towerlab.run_name` = 'stopme'")
        assert run.info.status == "RUNNING"
        proc.send_signal(signal.SIGTERM)  # what `kill`, `ray job stop` and a pod eviction send
        out, err = proc.communicate(timeout=120)
    finally:
        stop_group(proc, timeout=5)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: training run 'stopme' stopped by SIGTERM; MLflow run {run.info.run_id} marked KILLED"]
    assert "Traceback" not in err
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and "towerlab.failure" not in run.data.tags


def test_sigkilled_driver_is_found_and_closed_by_runs_doctor(repo_root, tmp_path, ray_cluster, mlflow_server):
    client = MlflowClient(mlflow_server)
    proc = _launch(_train_args(repo_root, "killme", mlflow_server), tmp_path)
    try:
        (run,) = _wait_for_metric(client, proc, "tags.`towerlab.run_name` = 'killme'")
    finally:
        stop_group(proc, timeout=0)  # SIGKILL at once: the driver cannot end its run
    proc.wait()
    time.sleep(3)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    last = float(client.get_run(run.info.run_id).data.tags["towerlab.heartbeat"])

    listed = run_cli(["runs", "doctor", "--tracking-uri", mlflow_server, "--stale-after", "2"], cwd=tmp_path,
                     timeout=120)
    assert listed.returncode == 0 and run.info.run_id in listed.stdout, listed.stdout + listed.stderr
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    fixed = run_cli(["runs", "doctor", "--tracking-uri", mlflow_server, "--stale-after", "2", "--fix"],
                    cwd=tmp_path, timeout=120)
    assert fixed.returncode == 0 and "closed" in fixed.stdout, fixed.stdout + fixed.stderr
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["towerlab.failure"] == "driver died: no heartbeat since " + time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(last))


def test_sigterm_ends_a_sweep_and_its_open_children_killed(repo_root, tmp_path, ray_cluster, mlflow_server):
    sweep = tmp_path / "stopsweep.yaml"
    sweep.write_text(f"""name: stopsweep
recipe: {repo_root}/recipes/debug.yaml
overrides: [train.steps=100000, train.log_every=1, eval.every=100000, train.checkpoint_every=100000]
space:
  loss.temperature_init: {{grid: [0.05, 0.5]}}
metric: train/loss
mode: min
max_concurrent_trials: 2
workers_per_trial: 1
""")
    client = MlflowClient(mlflow_server)
    proc = _launch(["sweep", str(sweep), "--tracking-uri", mlflow_server], tmp_path)
    try:
        _wait_for_metric(client, proc, "tags.`towerlab.sweep` = 'stopsweep' and tags.`towerlab.role` = 'trial'",
                         timeout=900)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        stop_group(proc, timeout=5)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: sweep '{sweep}' stopped by SIGTERM"], err[-3000:]
    (parent,) = _runs(client, "tags.`towerlab.sweep` = 'stopsweep' and tags.`towerlab.role` = 'sweep'")
    children = _runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED"
    assert children and all(c.info.status == "KILLED" for c in children), [c.info.status for c in children]
