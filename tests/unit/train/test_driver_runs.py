"""No MLflow run is left RUNNING by the driver (real MLflow, a local SQLite store; nothing here reaches Ray): a
failure between creating the run and training closes it FAILED with the reason; a stop signal closes it KILLED; a
resume the store or the checkpoint cannot serve is one line, before the run is touched; a dead driver's run is
closed by the next launch and by `towerlab runs doctor --fix`."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import pytest

from towerlab.cli import main
from towerlab.config import ConfigError, to_yaml
from towerlab.tracking import MlflowRun, stop, tags as T
from towerlab.train.checkpoint import RUN_FILE
from towerlab.train.driver import train
from towerlab.train.recipe import load_recipe


pytestmark = pytest.mark.usefixtures("restore_signals")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Unit tests never start Ray: a launch that got that far is a failure of the test."""
    def refuse(*a, **k):
        raise AssertionError("the driver reached Ray in a unit test")

    monkeypatch.setattr("towerlab.train.driver.init_ray", refuse)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "synthetic"  # prepared by the first launch, read by the others


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one takes MLflow seconds); each test has its own experiment."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlruns.db"
    return uri, MlflowClient(uri)


@pytest.fixture
def experiment(request, store):
    return request.node.name[:200]


@pytest.fixture
def setup(tmp_path, repo_root, data_path, store, experiment):
    uri, client = store
    recipe = load_recipe(repo_root / "recipes" / "debug.yaml",
                         [f"data.path={data_path}", f"train.storage_path={tmp_path}/results", "name=r1",
                          f"tracking.uri={uri}", f"tracking.experiment={experiment}"])
    return recipe, uri, client


def _runs(client, recipe):
    exp = client.get_experiment_by_name(recipe.tracking.experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


class Refuse(Exception):
    pass


def _stop_before_ray(summary):
    raise Refuse("stopped in on_start, before Ray")


def test_a_param_mlflow_refuses_closes_the_run_failed(setup):
    recipe, uri, client = setup
    recipe = dataclasses.replace(recipe, evals={**recipe.evals, "top@1": next(iter(recipe.evals.values()))})
    with pytest.raises(ConfigError, match="MLflow refused the run's params"):
        train(recipe)
    (run,) = _runs(client, recipe)
    assert run.info.status == "FAILED"
    assert "top@1" in run.data.tags[T.FAILURE]


def test_a_storage_path_that_is_a_file_closes_the_run_failed(setup, tmp_path, monkeypatch):
    recipe, uri, client = setup
    # the driver refuses such a path before creating the run (tests/unit/test_bad_inputs.py); without that check,
    # the run directory's creation is the net, and it must close the run it opened
    monkeypatch.setattr("towerlab.train.driver._check_storage", lambda path: None)
    (tmp_path / "afile").write_text("mine")
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, storage_path=str(tmp_path / "afile")))
    with pytest.raises(ConfigError, match=r"train.storage_path=.*afile: cannot hold the run directory"):
        train(recipe)
    (run,) = _runs(client, recipe)
    assert run.info.status == "FAILED"
    assert run.data.tags[T.FAILURE].startswith("ConfigError: train.storage_path=")
    assert (tmp_path / "afile").read_text() == "mine"


def test_sigterm_ends_the_run_killed(setup):
    recipe, uri, client = setup
    saved = {s: signal.getsignal(s) for s in stop.SIGNALS}
    stop.install()
    try:
        def on_start(summary):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here

        with pytest.raises(KeyboardInterrupt):
            train(recipe, on_start=on_start)
        assert stop.received() == signal.SIGTERM and stop.exit_code() == 143
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        stop._state.update(installed=False, received=None)
    (run,) = _runs(client, recipe)
    assert run.info.status == "KILLED"
    assert float(run.data.tags[T.HEARTBEAT]) > time.time() - 60


def _finished_run(recipe, uri, client, with_checkpoint=True):
    """A run as a finished `towerlab train` leaves it: FINISHED in MLflow, its run file, a checkpoint."""
    run = MlflowRun.start(uri, recipe.tracking.experiment, recipe.name, {"a": 1}, {T.HEARTBEAT: f"{time.time():.0f}"})
    run.end("FINISHED")
    run_dir = os.path.join(recipe.train.storage_path, recipe.name)
    os.makedirs(os.path.join(run_dir, "checkpoint_2026-01-01_00-00-00", "ds"))
    with open(os.path.join(run_dir, "checkpoint_2026-01-01_00-00-00", "recipe.yaml"), "w") as f:
        f.write(to_yaml(recipe))
    with open(os.path.join(run_dir, RUN_FILE), "w") as f:
        json.dump({"mlflow_run_id": run.run_id, "tracking_uri": uri}, f)
    return run.run_id


def test_resume_with_a_recipe_that_changes_the_checkpoint_is_refused(setup, repo_root):
    recipe, uri, client = setup
    run_id = _finished_run(recipe, uri, client)
    wider = load_recipe(repo_root / "recipes" / "debug.yaml",
                        [f"data.path={recipe.data.path}", f"train.storage_path={recipe.train.storage_path}",
                         "name=r1", f"tracking.uri={uri}", f"tracking.experiment={recipe.tracking.experiment}",
                         f"model.embed_dim={recipe.model.embed_dim * 2}"])
    with pytest.raises(ConfigError) as e:
        train(wider)
    msg = str(e.value)
    assert f"run 'r1' cannot resume from {recipe.train.storage_path}/r1/checkpoint_" in msg
    assert f"x{recipe.model.embed_dim} -> " in msg and f"x{recipe.model.embed_dim * 2}" in msg
    assert "new name=" in msg and f"delete {recipe.train.storage_path}/r1" in msg
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and T.FAILURE not in run.data.tags  # never turned FAILED


def test_main_prints_the_refused_resume_as_one_line(setup, repo_root, tmp_path, capsys):
    recipe, uri, client = setup
    _finished_run(recipe, uri, client)
    assert main(["train", str(repo_root / "recipes" / "debug.yaml"), f"data.path={recipe.data.path}",
                 f"train.storage_path={recipe.train.storage_path}", "name=r1", f"tracking.uri={uri}",
                 f"tracking.experiment={recipe.tracking.experiment}", f"model.embed_dim={recipe.model.embed_dim * 2}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run 'r1' cannot resume from "), err
    assert "the recipe changes what the checkpoint holds (" in err[0]


def test_resume_against_another_store_is_one_line(setup):
    """The run directory remembers a run of another store (MLFLOW_TRACKING_URI changed since): this store lacks it."""
    recipe, uri, client = setup
    run_dir = os.path.join(recipe.train.storage_path, recipe.name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, RUN_FILE), "w") as f:
        json.dump({"mlflow_run_id": "f" * 32, "tracking_uri": "sqlite:////elsewhere/mlruns.db"}, f)
    with pytest.raises(ConfigError) as e:
        train(recipe)
    msg = str(e.value)
    assert f"resumes MLflow run {'f' * 32}, recorded in sqlite:////elsewhere/mlruns.db, which the tracking store " \
           f"{uri} does not have" in msg
    assert "new name=" in msg and f"delete {run_dir}" in msg
    assert _runs(client, recipe) == []  # nothing created


def test_next_launch_closes_its_dead_run(setup):
    recipe, uri, client = setup
    run_id = _finished_run(recipe, uri, client)
    client.update_run(run_id, status="RUNNING")  # its driver was SIGKILLed 10 minutes ago
    client.set_tag(run_id, T.HEARTBEAT, f"{time.time() - 600:.0f}")
    with pytest.raises(Refuse):
        train(recipe, on_start=_stop_before_ray)
    run = client.get_run(run_id)
    # closed FAILED with the reason, reopened for the resume, which then failed on its own cause
    assert run.data.tags[T.PREVIOUS_FAILURE].startswith("driver died: no heartbeat since ")
    assert run.data.tags[T.FAILURE] == "Refuse: stopped in on_start, before Ray"
    assert run.info.status == "FAILED"


def test_runs_doctor_lists_and_fixes_dead_runs(store, experiment, capsys):
    uri, client = store
    exp = client.create_experiment(experiment)
    now = time.time()

    def run(name, heartbeat=None, status=None):
        r = client.create_run(exp, run_name=name,
                              tags={} if heartbeat is None else {T.HEARTBEAT: f"{now - heartbeat:.0f}"}).info.run_id
        if status:
            client.set_terminated(r, status)
        return r

    dead, live, foreign, done = run("dead", 900), run("live", 10), run("foreign"), run("done", 900, "FINISHED")
    assert main(["runs", "doctor", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert dead in out and all(r not in out for r in (live, foreign, done))
    assert client.get_run(dead).info.status == "RUNNING"  # listing changes nothing

    assert main(["runs", "doctor", "--tracking-uri", uri, "--fix"]) == 0
    assert "closed 1 run FAILED" in capsys.readouterr().out
    assert client.get_run(dead).info.status == "FAILED"
    assert client.get_run(dead).data.tags[T.FAILURE].startswith("driver died: no heartbeat since ")
    assert [client.get_run(r).info.status for r in (live, foreign, done)] == ["RUNNING", "RUNNING", "FINISHED"]

    assert main(["runs", "doctor", "--tracking-uri", uri, "--stale-after", "5"]) == 0  # live is 10 s old
    assert live in capsys.readouterr().out


def test_a_failed_sweep_closes_its_open_children(store, experiment):
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from towerlab.sweep.run import close_open_children

    uri, client = store
    exp = client.create_experiment(experiment)
    parent = client.create_run(exp).info.run_id
    running = client.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: parent}).info.run_id
    finished = client.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: parent}).info.run_id
    client.set_terminated(finished, "FINISHED")
    other = client.create_run(exp).info.run_id
    assert close_open_children(uri, parent, "KILLED") == [running]
    assert [client.get_run(r).info.status for r in (running, finished, other)] == ["KILLED", "FINISHED", "RUNNING"]


def test_heartbeat_beats_until_stopped(store, experiment):
    from towerlab.tracking.heartbeat import Heartbeat

    uri, client = store
    rid = client.create_run(client.create_experiment(experiment)).info.run_id
    client.set_tag(rid, T.HEARTBEAT, "1")
    hb = Heartbeat(client, rid, interval=0.2).start()
    first = float(client.get_run(rid).data.tags[T.HEARTBEAT])
    assert first > time.time() - 30
    time.sleep(1.5)
    hb.stop()
    last = client.get_run(rid).data.tags[T.HEARTBEAT]
    time.sleep(0.6)
    assert client.get_run(rid).data.tags[T.HEARTBEAT] == last  # stopped


def test_the_run_has_its_training_data_as_a_dataset_input(setup):
    """Logged by the driver with the run's other records, before any worker starts (tracking/dataset_input.py)."""
    recipe, uri, client = setup
    with pytest.raises(Refuse):
        train(recipe, on_start=_stop_before_ray)
    (run,) = _runs(client, recipe)
    [given] = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert given.dataset.name == recipe.data.source
    assert given.dataset.digest == run.data.tags[T.DATA_FINGERPRINT][:12]
    assert json.loads(given.dataset.source)["uri"] == str(recipe.data.path)
    assert json.loads(given.dataset.profile)["samples"] > 0
