"""`towerlab sweep` end to end on a real `ray start` cluster and a real MLflow server: an 8-trial ASHA sweep with
early stops and deliberately failing (NaN) trials finishes; the parent/child runs and their statuses are right;
a sweep whose driver is SIGKILLed resumes with `--resume`, without rerunning finished trials."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from mlflow import MlflowClient

from .conftest import BIN, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


# Steps per trial. ASHA's rungs (grace 5, reduction 2) are at 5, 10, 20, 40: a trial cut at an early rung keeps
# running while Tune stops it (a debug step takes a fraction of a second), so the budget must leave it room.
STEPS = 40


OVERRIDES = f"train.steps={STEPS}, train.log_every=5, eval.every=5, train.checkpoint_every=10, optim.warmup_steps=2"


def _sweep_file(tmp_path, repo_root, name: str, space: str, extra: str = "", overrides: str = OVERRIDES,
                metric: str = "metric: eval/zeroshot/top1\nmode: max") -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"""name: {name}
recipe: {repo_root}/recipes/debug.yaml
overrides: [{overrides}]
space:
{space}
{metric}
{extra}""")
    return str(p)


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _parent(client, name):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`towerlab.sweep` = '{name}' and tags.`towerlab.role` = 'sweep'")
    assert len(runs) == 1, runs
    return runs[0]


def test_asha_sweep_with_failures(repo_root, tmp_path, ray_cluster, mlflow_server):
    space = ("  loss.temperature_init: {grid: [0.02, 0.1, 0.3, 1.0]}\n"
             "  optim.lr: {grid: [0.003, 1.0e+30]}\n")  # lr=1e30 diverges: a NaN loss, an isolated failure
    # one worker per trial keeps 8 trials' start-ups affordable on 2 cores; a stopped trial's placement group is
    # still freed by Ray Train's cleaner through the State API, which is what this test is about
    f = _sweep_file(tmp_path, repo_root, "asha8", space,
                    "scheduler: {name: asha, grace_period: 5, reduction_factor: 2}\nmax_concurrent_trials: 2\n"
                    "workers_per_trial: 1\n")
    out = run_cli(["sweep", f, "--tracking-uri", mlflow_server], cwd=tmp_path, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "8 trials, 4 failed" in out.stdout.replace("\n", " ")

    client = MlflowClient(mlflow_server)
    parent = _parent(client, "asha8")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best.optim.lr"] == "0.003"
    assert "best/eval/zeroshot/top1" in parent.data.metrics
    assert "sweep.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    kids = _children(client, parent.info.run_id)
    assert len(kids) == 8
    by_status: dict[str, list] = {}
    for k in kids:
        by_status.setdefault(k.info.status, []).append(k)
    assert "RUNNING" not in by_status
    failed = by_status.get("FAILED", [])
    assert len(failed) == 4 and all(k.data.params["optim.lr"] == "1e+30" for k in failed)
    assert all("non-finite loss" in k.data.tags.get("towerlab.failure", "") for k in failed)
    # ASHA stopped some: of 4 finite trials at least one falls below the best half at a rung (grace 5, factor 2)
    assert len(by_status.get("KILLED", [])) >= 1, {s: len(v) for s, v in by_status.items()}
    assert len(by_status.get("FINISHED", [])) >= 1
    for k in kids:  # the child run says what it is, and carries its resolved recipe
        assert k.info.run_name.startswith("clip t=") and " b=64" in k.info.run_name and " lr=" in k.info.run_name
        assert "recipe.yaml" in {a.path for a in client.list_artifacts(k.info.run_id)}
    last_steps = [max(m.step for m in client.get_metric_history(k.info.run_id, "train/loss"))
                  for k in by_status["KILLED"]]
    assert min(last_steps) < STEPS, last_steps  # stopped before its budget

    compare = run_cli(["compare", "--sweep", "asha8", "--tracking-uri", mlflow_server], cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr
    assert (tmp_path / "results" / "compare-asha8.png").stat().st_size > 1000
    assert "compare-asha8.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_resume_after_sigkill(repo_root, tmp_path, ray_cluster, mlflow_server):
    # two trials, one at a time: the driver is killed once the first has finished, while the second runs or waits
    f = _sweep_file(tmp_path, repo_root, "resumable", "  loss.temperature_init: {grid: [0.05, 0.5]}\n",
                    "workers_per_trial: 2\n")
    exe = str(BIN / "towerlab")
    proc = subprocess.Popen([exe, "sweep", f, "--tracking-uri", mlflow_server], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient(mlflow_server)
    deadline = time.time() + 600
    finished_before: set[str] = set()
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(3)
            try:
                parent = _parent(client, "resumable")
            except (AssertionError, Exception):
                continue
            finished_before = {k.data.tags["towerlab.trial_id"] for k in _children(client, parent.info.run_id)
                               if k.info.status == "FINISHED"}
            if finished_before:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies without any chance to clean up
        proc.wait()
    assert finished_before, "no trial finished before the kill"
    parent_id = _parent(client, "resumable").info.run_id

    out = run_cli(["sweep", "--resume", "resumable", "--tracking-uri", mlflow_server], cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parent = _parent(client, "resumable")
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    kids = _children(client, parent_id)
    trial_ids = [k.data.tags["towerlab.trial_id"] for k in kids]
    assert len(trial_ids) == len(set(trial_ids)) == 2  # one run per trial: finished trials were not rerun
    assert all(k.info.status == "FINISHED" for k in kids), [(k.info.run_name, k.info.status) for k in kids]
    for k in kids:
        if k.data.tags["towerlab.trial_id"] in finished_before:
            steps = [m.step for m in client.get_metric_history(k.info.run_id, "train/loss")]
            assert steps == list(range(5, STEPS + 1, 5))  # each step logged once: not trained again


def test_pbt_hands_the_best_checkpoint_on(repo_root, tmp_path, ray_cluster, mlflow_server):
    """Population-based training of a fixed temperature: the trial at a useless temperature (1.0: logit scale 1) is
    in the bottom half at a perturbation, takes over the other trial's checkpoint and continues with that trial's
    temperature perturbed (x0.8 or x1.2), in its same MLflow child run."""
    # train/loss, not zero-shot accuracy: at scale 1 the loss stays near log(batch) while the other's falls
    f = _sweep_file(tmp_path, repo_root, "pbt2", "  loss.temperature_init: {grid: [0.05, 1.0]}\n",
                    # synch: both trials are compared at step 10 whatever their start-up times (asynchronous, the
                    # slow one was once handed the other's final step-30 checkpoint and had nothing left to train)
                    "scheduler: {name: pbt, perturbation_interval: 10, quantile_fraction: 0.5, "
                    "resample_probability: 0.0, synch: true}\nmax_concurrent_trials: 2\nworkers_per_trial: 1\n",
                    # one comparison, at step 10 (each synchronous pause restarts both trials' Train runs: ~25 s)
                    overrides="train.steps=20, train.log_every=5, eval.every=10, train.checkpoint_every=10, "
                              "optim.warmup_steps=2, loss.learn_temperature=false",
                    metric="metric: train/loss\nmode: min")
    out = run_cli(["sweep", f, "--tracking-uri", mlflow_server], cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    parent = _parent(client, "pbt2")
    kids = _children(client, parent.info.run_id)
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids), \
        [(k.info.run_name, k.info.status) for k in kids]
    hot = next(k for k in kids if k.data.params["loss.temperature_init"] == "1.0")
    scales = {m.step: m.value for m in client.get_metric_history(hot.info.run_id, "train/logit_scale")}
    assert abs(scales[min(scales)] - 1.0) < 1e-4  # it started at its own temperature
    # ... and after the hand-over trains at 1/(0.05 x 0.8 or 1.2) = 16.7 or 25, up to the last step
    assert max(scales) == 20 and min(abs(scales[20] - 1 / (0.05 * p)) for p in (0.8, 1.2)) < 1e-3, scales


def test_replicates_retry_failed_and_extend(repo_root, tmp_path, ray_cluster, mlflow_server):
    """search.seeds=2: every configuration trains twice (seeds 0 and 1) with the same values, tagged for grouping;
    `--resume --retry-failed` reruns the failed trials in their own child runs (finished ones are left alone);
    `--resume --extend 1` adds seed 2 of both configurations under the same parent."""
    f = _sweep_file(tmp_path, repo_root, "reps", "  optim.lr: {grid: [0.003, 1.0e+30]}\n",  # 1e30: a NaN, fails
                    "search: {seeds: 2}\nmax_concurrent_trials: 2\nworkers_per_trial: 1\n",
                    overrides="train.steps=10, train.log_every=5, eval.every=5, train.checkpoint_every=5, "
                              "optim.warmup_steps=2")
    out = run_cli(["sweep", f, "--tracking-uri", mlflow_server], cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    parent_id = _parent(client, "reps").info.run_id
    kids = _children(client, parent_id)
    seeds = sorted((k.data.params["optim.lr"], k.data.tags["towerlab.seed"], k.data.params["seed"]) for k in kids)
    assert seeds == [("0.003", "0", "0"), ("0.003", "1", "1"), ("1e+30", "0", "0"), ("1e+30", "1", "1")]
    configs = {k.data.tags["towerlab.config"] for k in kids}
    assert len(configs) == 2 and all("seed" not in c for c in configs), configs  # replicates share their config
    finished = {k.info.run_id: k.info.end_time for k in kids if k.info.status == "FINISHED"}
    assert len(finished) == 2

    out = run_cli(["sweep", "--resume", "reps", "--retry-failed", "--tracking-uri", mlflow_server], cwd=tmp_path,
                  timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    kids = _children(client, parent_id)
    assert len(kids) == 4  # the retried trials continued their own runs
    for k in kids:
        if k.info.run_id in finished:  # not rerun
            assert k.info.status == "FINISHED" and k.info.end_time == finished[k.info.run_id]
        else:  # rerun (and diverged again): the run says what ended the launch before
            assert k.info.status == "FAILED" and "non-finite" in k.data.tags.get("towerlab.previous_failure", "")

    out = run_cli(["sweep", "--resume", "reps", "--extend", "1", "--tracking-uri", mlflow_server], cwd=tmp_path,
                  timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _parent(client, "reps").info.run_id == parent_id
    kids = _children(client, parent_id)
    assert len(kids) == 6
    added = [k for k in kids if k.data.tags["towerlab.seed"] == "2"]
    assert len(added) == 2 and {k.data.tags["towerlab.config"] for k in added} == configs
    assert "6 trials" in out.stdout.replace("\n", " ")
