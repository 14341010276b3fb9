"""What a comparison of runs needs beside their metrics, against a real MLflow SQLite store: the training data as
the run's dataset input (tracking/dataset_input.py) and each node's system metrics (tracking/system_metrics.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from towerlab.data import prepare
from towerlab.data.shards import Manifest
from towerlab.tracking.dataset_input import DIGEST_LEN, dataset_name, log_training_dataset
from towerlab.tracking.system_metrics import SystemMetrics

CPU = "cpu_utilization_percentage"


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """One store for the module (creating its schema takes seconds), a new run per test."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("inputs")


@pytest.fixture
def store(sqlite_store):
    uri, client, experiment = sqlite_store
    return uri, client, client.create_run(experiment).info.run_id


def _inputs(client, run_id):
    return client.get_run(run_id).inputs.dataset_inputs


def test_prepared_data_is_the_runs_training_dataset(store, tmp_path):
    uri, client, run_id = store
    manifest = prepare("synthetic", tmp_path / "synthetic", shards=3, size=40)
    assert log_training_dataset(client, run_id, "synthetic", manifest)

    [given] = _inputs(client, run_id)
    assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "training"}
    ds = given.dataset
    assert ds.name == "synthetic"
    assert ds.digest == manifest.fingerprint[:DIGEST_LEN]
    assert ds.source_type == "local" and json.loads(ds.source) == {"uri": str(tmp_path / "synthetic")}
    profile = json.loads(ds.profile)
    assert profile["samples"] == manifest.counts["train"] and profile["shards"] == 3
    assert profile["heldout_samples"] == manifest.counts["heldout"] > 0
    assert profile["fingerprint"] == manifest.fingerprint


def test_a_credential_in_the_data_uri_stays_out_of_the_store(store):
    uri, client, run_id = store
    # foreign shards listed in place: what data/foreign.py builds (a listing, no files read here)
    located = "s3://alice:hunter2secret@bucket/laion/{00000..00001}.tar"
    manifest = Manifest(Path("/bucket/laion"), {
        "counts": {"train": 20000}, "splits": {"train": [{"file": "00000.tar"}, {"file": "00001.tar"}]},
        "fingerprint": "ab" * 32, "fingerprint_of": "shard names and listed sizes (not contents)",
        "count_source": "data.num_samples", "foreign": True}, SimpleNamespace(display=located))
    assert log_training_dataset(client, run_id, "webdataset", manifest)

    [given] = _inputs(client, run_id)
    ds = given.dataset
    assert "hunter2secret" not in ds.source and "alice" not in ds.source
    assert ds.source_type == "s3" and "bucket/laion/{00000..00001}.tar" in json.loads(ds.source)["uri"]
    assert ds.name == "laion" and ds.digest == "ab" * (DIGEST_LEN // 2)
    profile = json.loads(ds.profile)
    assert (profile["samples"], profile["shards"], profile["count_source"]) == (20000, 2, "data.num_samples")


@pytest.mark.parametrize("source, location, name", [
    ("digits", "/data/digits", "digits"),  # a built-in source is named by itself
    ("parquet", "/corpora/coco_prepared/", "coco_prepared"),
    ("webdataset", "/data/cc3m/00000.tar", "cc3m"),
    ("webdataset", "/data/a/{0..9}.tar, /data/b/{0..9}.tar", "a"),
])
def test_dataset_name(source, location, name):
    assert dataset_name(source, location) == name


def test_a_store_that_refuses_the_input_is_a_warning(store, tmp_path, capsys):
    uri, client, _ = store
    manifest = prepare("synthetic", tmp_path / "synthetic", shards=2, size=20)
    assert not log_training_dataset(client, "0" * 32, "synthetic", manifest)  # no such run
    assert "warning: the training data is not logged as an MLflow dataset input" in capsys.readouterr().err


def _cpu_points(client, run_id, node):
    return client.get_metric_history(run_id, f"system/{node}/{CPU}")


def _monitor_threads():
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_system_metrics_are_logged_per_node_until_stopped(store):
    uri, client, run_id = store
    monitor = SystemMetrics(uri, run_id, every=0.2, node="10.0.0.5").start()
    try:
        deadline = time.monotonic() + 10
        while len(_cpu_points(client, run_id, "10.0.0.5")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_cpu_points(client, run_id, "10.0.0.5")) >= 2
        keys = client.get_run(run_id).data.metrics
        assert "system/10.0.0.5/system_memory_usage_megabytes" in keys
    finally:
        monitor.stop()
    assert not _monitor_threads()  # stop() waited for the thread
    logged = len(_cpu_points(client, run_id, "10.0.0.5"))
    time.sleep(0.8)  # four intervals
    assert len(_cpu_points(client, run_id, "10.0.0.5")) == logged


def test_a_resumed_run_continues_the_system_metric_steps(store):
    uri, client, run_id = store
    for _ in range(2):  # two launches of the same run
        monitor = SystemMetrics(uri, run_id, every=0.2, node="n").start()
        deadline = time.monotonic() + 10
        first = len(_cpu_points(client, run_id, "n"))
        while len(_cpu_points(client, run_id, "n")) == first and time.monotonic() < deadline:
            time.sleep(0.1)
        monitor.stop()
    steps = [m.step for m in _cpu_points(client, run_id, "n")]
    assert len(steps) == len(set(steps)) >= 2  # the second launch did not write its first step over the first's


def test_system_metrics_off_and_an_ended_run(store):
    uri, client, run_id = store
    SystemMetrics(uri, run_id, every=0, node="off").start().stop()
    assert not _monitor_threads()
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]

    # the driver ended the run: the monitor stops by itself rather than log into it
    monitor = SystemMetrics(uri, run_id, every=0.2, node="late").start()
    client.set_terminated(run_id, "FAILED")
    deadline = time.monotonic() + 10
    while _monitor_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _monitor_threads()
    monitor.stop()


def test_a_store_that_fails_does_not_reach_the_caller(sqlite_store, tmp_path, capsys):
    # a store that cannot be opened (its path lies under a file): the monitor cannot start, and says so
    (tmp_path / "afile").touch()
    monitor = SystemMetrics(f"sqlite:///{tmp_path}/afile/m.db", "0" * 32, every=0.1, node="x").start()
    monitor.stop()
    assert "warning: no system metrics for node x" in capsys.readouterr().err

    # a call of the running monitor fails (here: the store has no such run, as when it is down): MLflow's monitor
    # ends its own thread, and neither it nor stop() raises
    uri, _, _ = sqlite_store
    monitor = SystemMetrics(uri, "0" * 32, every=0.1, node="y").start()
    deadline = time.monotonic() + 10
    while _monitor_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _monitor_threads()
    monitor.stop()
