"""Faults injected into real runs (real `ray start` cluster, real `mlflow server`), each ending with no MLflow run
left RUNNING, the data and earlier checkpoints intact, and one line saying what happened and what to do:

- the MLflow server killed and restarted mid-run (a server of this test's own: the session's serves other tests):
  rank 0 keeps training through the outage, its metrics wait in a bounded buffer and arrive late, the run ends
  FINISHED;
- a checkpoint written into a full filesystem (train.storage_path on a small tmpfs that holds the first checkpoint,
  not the second): FAILED with one line naming the storage path, the lack of space and the fixes; the first
  checkpoint stays the run's latest and loads, no partial checkpoint directory is left;
- a truncated WebDataset shard (not hashed at launch: data.verify_shards is off by default): by default FAILED with
  one line naming the shard and the fix; with data.bad_shards=skip the run finishes and records the skipped shard.

SIGTERM of `towerlab train` / `towerlab sweep` and a SIGKILLed driver are in test_stop.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import BIN, free_port, run_cli, stop_group, wait_http
from .test_stop import _launch, _runs, _wait_for_metric

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]

DEBUG_ARGS = ["eval.every=100000", "--no-progress"]


def _errors(text: str, prefix: str = "error:") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def _own_mlflow(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on `port` over root/mlflow.db (as conftest's mlflow_server), appending to root/server.log."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "server.log", "a") as log:
        return subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # as conftest's: no job runner


def test_mlflow_server_killed_and_restarted_mid_run(repo_root, tmp_path, ray_cluster):
    root, port = tmp_path / "mlflow", free_port()
    uri = f"http://127.0.0.1:{port}"
    servers = [_own_mlflow(root, port)]
    proc = None
    steps = 200
    try:
        wait_http(f"{uri}/health", 120, servers[-1])
        client = MlflowClient(uri)
        proc = _launch(["train", str(repo_root / "recipes" / "debug.yaml"), "name=outage", f"train.steps={steps}",
                        "train.log_every=1", "train.checkpoint_every=100000", *DEBUG_ARGS, "--tracking-uri", uri],
                       tmp_path)
        (run,) = _wait_for_metric(client, proc, "tags.`towerlab.run_name` = 'outage'")
        stop_group(servers[-1], timeout=0)  # SIGKILL: the server is gone, as in a crash
        down = time.time()
        time.sleep(5)
        assert proc.poll() is None, "the run ended during the outage: give it more steps"
        servers.append(_own_mlflow(root, port))  # the same port and store, as a restarted service
        wait_http(f"{uri}/health", 120, servers[-1])
        up = time.time()
        out, err = proc.communicate(timeout=600)
        (tmp_path / "train.stderr").write_text(err)  # kept by pytest for a look after a failure

        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        assert _errors(err) == [] and "Traceback" not in err, err[-3000:]
        # the outage said once by rank 0 (Ray prefixes its lines with the worker's name), and its end
        assert err.count("warning: MLflow did not take rank 0's metrics") == 1, err[-3000:]
        assert "MLflow answers again after" in err and "dropped" not in err, err[-3000:]
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))  # every point, late or not
        # training went on while the server was down: points were logged (timestamped when logged) in the outage
        assert any(down * 1000 < m.timestamp < up * 1000 for m in history), (down, up)
    finally:
        if proc is not None:
            stop_group(proc, timeout=5)
        for s in servers:
            stop_group(s, timeout=5)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 768 KiB: one checkpoint of the debug model (about 4 x 4 bytes x 28.6k parameters: weights, fp32
    master copy and two Adam moments, ZeRO-partitioned) fits, a second does not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full filesystem needs `mount -t tmpfs` (root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_checkpoint_into_a_full_filesystem(repo_root, tmp_path, small_tmpfs, ray_cluster, mlflow_server):
    from towerlab.data import read_manifest
    from towerlab.train.checkpoint import load_model, resolve_target

    client = MlflowClient(mlflow_server)
    out = run_cli(["train", str(repo_root / "recipes" / "debug.yaml"), "name=full", "train.steps=6",
                   "train.log_every=1", "train.checkpoint_every=2", f"train.storage_path={small_tmpfs}", *DEBUG_ARGS,
                   "--tracking-uri", mlflow_server], cwd=tmp_path, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    errors = _errors(out.stderr)
    assert len(errors) == 1, out.stderr[-3000:]
    for part in ("no space left on device", str(small_tmpfs / "full"), "free space", "train.storage_path",
                 "train.keep_checkpoints"):
        assert part in errors[0], errors[0]
    (run,) = _runs(client, "tags.`towerlab.run_name` = 'full'")
    assert run.info.status == "FAILED" and "no space left" in run.data.tags["towerlab.failure"]

    # the step-2 checkpoint is the only one, the run's latest, and loads; the failed one left no directory behind
    run_dir = small_tmpfs / "full"
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 1, [(p.name, sorted(str(f.relative_to(p)) for f in p.rglob("*"))) for p in ckpts]
    ckpt = ckpts[0]
    target = resolve_target(str(run_dir), None)
    assert target.checkpoint == ckpt and target.run_id == run.info.run_id
    model, step = load_model(target.checkpoint, target.recipe)
    assert step == 2 and sum(p.numel() for p in model.parameters()) > 0
    # the data the run trained on is as prepared (every shard matches its checksum)
    read_manifest(tmp_path / "data" / "synthetic", verify=True)


def test_corrupt_shard_named_or_skipped(repo_root, tmp_path, make_image_folder, ray_cluster, mlflow_server):
    from towerlab.data.folder import prepare_images

    src = make_image_folder(tmp_path / "src", n=80)
    data = tmp_path / "wds"
    prepare_images(src["images"], src["csv"], data, fmt="webdataset", shard_size=25)
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]) == 3
    bad = data / "train" / "part-00001.tar"
    # cut inside the first member's bytes (after its 512-byte header): a download that stopped part-way
    bad.write_bytes(bad.read_bytes()[:600])
    others = {p: p.read_bytes() for p in data.rglob("*.tar") if p != bad}
    client = MlflowClient(mlflow_server)
    common = [str(repo_root / "recipes" / "debug.yaml"), "data.source=webdataset", f"data.path={data}",
              "data.global_batch=16", "train.steps=4", "train.log_every=2", "train.checkpoint_every=4",
              "eval.every=100000"]
    flags = ["--no-progress", "--tracking-uri", mlflow_server]

    failed = run_cli(["train", *common, "name=badshard", *flags], cwd=tmp_path, timeout=600)
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    lines = _errors(failed.stderr)
    assert len(lines) == 1, failed.stderr[-3000:]
    line = lines[0]
    assert f"shard {bad} cannot be read" in line and "data.bad_shards=skip" in line, line
    (run,) = _runs(client, "tags.`towerlab.run_name` = 'badshard'")
    assert run.info.status == "FAILED" and str(bad) in run.data.tags["towerlab.failure"]

    skipped = run_cli(["train", *common, "name=skipshard", "data.bad_shards=skip", *flags], cwd=tmp_path, timeout=600)
    assert skipped.returncode == 0, skipped.stdout[-2000:] + skipped.stderr[-3000:]
    warnings = _errors(skipped.stderr, "warning: skipping shard")
    assert len(warnings) == 1 and str(bad) in warnings[0], skipped.stderr[-3000:]
    (run,) = _runs(client, "tags.`towerlab.run_name` = 'skipshard'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["towerlab.data_skipped_shards"] == "train/part-00001.tar"
    # nothing else of the dataset was touched
    assert {p: p.read_bytes() for p in data.rglob("*.tar") if p != bad} == others
    assert json.loads((data / "manifest.json").read_text()) == manifest
