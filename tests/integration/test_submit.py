"""`towerlab submit` end to end on a real two-node Ray cluster started by cluster/local/start.sh (a head with the
dashboard and token auth on 127.0.0.1, and a second `ray start --address` node): a wrong token, the debug recipe,
a job that fails, and a 2-trial sweep go through the Jobs API; the runs land in the session's real MLflow server;
cluster/local/stop.sh leaves no process of the cluster behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import psutil
import pytest
from mlflow import MlflowClient

from .conftest import BIN, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


def _project(tmp_path, repo_root):
    proj, shared = tmp_path / "proj", tmp_path / "shared"
    (proj / "recipes").mkdir(parents=True)
    (proj / "sweeps").mkdir()
    shutil.copy(repo_root / "recipes" / "debug.yaml", proj / "recipes" / "debug.yaml")
    # data and checkpoints on storage both nodes share (here: a directory of this machine), never inside the
    # working_dir: each node unpacks its own copy of that
    (proj / "sweeps" / "two.yaml").write_text(f"""name: two
recipe: ../recipes/debug.yaml
storage_path: {shared}/sweeps
overrides: [train.steps=4, train.log_every=2, eval.every=4, train.checkpoint_every=4, data.path={shared}/synthetic]
space:
  loss.temperature_init: {{grid: [0.05, 0.2]}}
metric: eval/zeroshot/top1
mode: max
max_concurrent_trials: 2
workers_per_trial: 1
""")
    return proj


def _lap(what: str, t0=[0.0]) -> None:  # noqa: B006 - the time of the previous lap
    now = time.monotonic()
    print(f"[test_submit] {what}: {now - t0[0]:.1f}s" if t0[0] else f"[test_submit] {what}")
    t0[0] = now


def _cluster_processes(state) -> list[psutil.Process]:
    """Every live process in the process groups of the cluster's nodes."""
    groups = {int(x) for x in (state / "pids").read_text().split()}
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def test_submit_train_and_sweep_to_local_cluster(repo_root, tmp_path, mlflow_server):
    proj = _project(tmp_path, repo_root)
    state = tmp_path / "ray"
    _lap("start")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HEAD_CPUS": "4", "WORKER_CPUS": "4"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([str(repo_root / "cluster/local/start.sh"), str(state)], env=env, capture_output=True,
                           text=True, timeout=240)
    assert start.returncode == 0, start.stdout + start.stderr
    _lap("cluster started")
    procs = _cluster_processes(state)
    try:
        assert "2 nodes" in start.stdout
        address = (state / "address").read_text().strip()
        assert address.startswith("http://127.0.0.1:")
        cluster = ["--address", address, "--token-file", str(state / "token")]
        # the client must send the token itself: no RAY_AUTH_* from this session
        clean = {"RAY_AUTH_TOKEN": "", "RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN_PATH": ""}

        wrong = tmp_path / "wrong-token"
        wrong.write_text("0" * 64)
        out = run_cli(["jobs", "ls", "--address", address, "--token-file", str(wrong)], cwd=proj, env=clean)
        assert out.returncode == 2
        assert f"Ray cluster at {address} rejected the token" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr

        shared = tmp_path / "shared"
        train = run_cli(["submit", "train", "recipes/debug.yaml", "name=submitted", "train.steps=4", "eval.every=4",
                         "train.log_every=2", "train.checkpoint_every=4", f"data.path={shared}/synthetic",
                         f"train.storage_path={shared}/results", *cluster,
                         "--tracking-uri", mlflow_server, "--follow"], cwd=proj, env=clean, timeout=600)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        sid = train.stdout.split("submitted ")[1].split()[0]
        assert sid.startswith("towerlab-train-submitted-")
        assert "zero-shot top-1" in train.stdout  # the job's own output, streamed by --follow
        assert f"job {sid} SUCCEEDED" in train.stdout
        _lap("train job")

        # a job that fails on the cluster (its data directory does not exist there): exit 1, one line
        bad = run_cli(["submit", "train", "recipes/debug.yaml", "name=nodata", "data.source=parquet",
                       "data.path=/nonexistent/shards", f"train.storage_path={shared}/results", *cluster,
                       "--tracking-uri", mlflow_server, "--follow"],
                      cwd=proj, env=clean, timeout=300)
        assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
        assert "FAILED" in bad.stderr and "towerlab jobs logs towerlab-train-nodata-" in bad.stderr
        _lap("failing job")
        assert "/nonexistent/shards" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr

        sweep = run_cli(["submit", "sweep", "sweeps/two.yaml", *cluster, "--tracking-uri", mlflow_server,
                         "--follow"], cwd=proj, env=clean, timeout=600)
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        assert "2 trials, 0 failed" in sweep.stdout.replace("\n", " ")
        _lap("sweep job")

        ls = run_cli(["jobs", "ls", *cluster], cwd=proj, env=clean)
        assert ls.returncode == 0 and sid in ls.stdout and "SUCCEEDED" in ls.stdout and "FAILED" in ls.stdout
        logs = run_cli(["jobs", "logs", sid, *cluster], cwd=proj, env=clean)
        assert logs.returncode == 0 and "zero-shot top-1" in logs.stdout
        missing = run_cli(["jobs", "stop", "towerlab-train-nope", *cluster], cwd=proj, env=clean)
        assert missing.returncode == 2 and "no job 'towerlab-train-nope'" in missing.stderr

        client = MlflowClient(mlflow_server)
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, "tags.`towerlab.run_name` = 'submitted'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["train.steps"] == "4" and "eval/zeroshot/top1" in runs[0].data.metrics
        parent = client.search_runs(exps, "tags.`towerlab.sweep` = 'two' and tags.`towerlab.role` = 'sweep'")
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        kids = client.search_runs(exps, f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
        assert sorted(k.data.params["loss.temperature_init"] for k in kids) == ["0.05", "0.2"]
        assert all(k.info.status == "FINISHED" for k in kids)
    finally:
        procs = procs + [p for p in _cluster_processes(state) if p not in procs]
        stop = subprocess.run([str(repo_root / "cluster/local/stop.sh"), str(state)], capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert len(procs) >= 4  # two `ray start` processes, a GCS, raylets, a dashboard...
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
