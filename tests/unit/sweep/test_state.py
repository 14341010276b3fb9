"""The sweep's state file (what `--resume` reads) is written once Ray Tune has started, and a first start that ends
before Tune saved any state leaves the sweep's name free. Run without Ray or MLflow: the tracking store, Ray's start,
the State API and Tune's Tuner are stand-ins; the ordering under test is run_sweep's own."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune import Tuner as RealTuner

from towerlab.config import ConfigError
from towerlab.sweep import run as R
from towerlab.sweep.load import load_sweep


class FakeRun:
    """MlflowRun's surface that run_sweep uses; remembers how each run ended."""

    ended: list[str] = []

    def __init__(self, uri=None, run_id="parent-1"):
        self.run_id, self.client = run_id, None

    @classmethod
    def start(cls, *args, **kwargs):
        return cls()

    def log_text(self, *args):
        pass

    def tags(self):
        return {}

    def set_tags(self, tags):
        pass

    def end(self, status):
        FakeRun.ended.append(status)


class Results(list):
    def get_best_result(self, *args, **kwargs):
        raise RuntimeError("no trial reported the metric")


def tuner(fit=None, init_error: BaseException | None = None):
    """A Tuner whose fit() is `fit(run_config)`: it may call the callbacks' setup as Tune does when it starts."""

    class FakeTuner:
        can_restore = staticmethod(RealTuner.can_restore)  # Tune's own: whether its tuner.pkl is there

        def __init__(self, trainable, param_space=None, tune_config=None, run_config=None):
            self.run_config = run_config
            if init_error:
                raise init_error
            # as Tune does when a Tuner is built: the experiment directory and the pickled tuner
            root = Path(run_config.storage_path) / run_config.name
            root.mkdir(parents=True, exist_ok=True)
            (root / "tuner.pkl").write_bytes(b"")

        def fit(self):
            return fit(self.run_config)

    return FakeTuner


def tune_starts(run_config):  # Tune sets up the experiment: the callbacks' setup
    for cb in run_config.callbacks:
        cb.setup(total_num_samples=1)


@pytest.fixture
def sweep(tmp_path, repo_root, monkeypatch):
    import ray.tune

    import towerlab.train.ray_env

    FakeRun.ended = []
    monkeypatch.setattr(R, "MlflowRun", FakeRun)
    monkeypatch.setattr(R, "check_reachable", lambda uri: None)
    monkeypatch.setattr(R, "Heartbeat", lambda client, run_id: SimpleNamespace(
        start=lambda: SimpleNamespace(stop=lambda: None)))
    monkeypatch.setattr(R, "close_open_children", lambda *args: [])
    monkeypatch.setattr(R, "check_state_api", lambda: None)
    monkeypatch.setattr(towerlab.train.ray_env, "init_ray", lambda cpus: None)
    # with_parameters puts its arguments into Ray's object store (a running Ray): the trainable is never run here
    monkeypatch.setattr(ray.tune, "with_parameters", lambda fn, **kw: fn)
    monkeypatch.setattr(ray.tune, "with_resources", lambda fn, resources: fn)
    p = tmp_path / "s.yaml"
    p.write_text(f"recipe: {repo_root}/recipes/debug.yaml\nspace: {{optim.lr: {{choice: [0.001, 0.003]}}}}\n"
                 f"storage_path: {tmp_path / 'results'}\nname: s1\n")
    return load_sweep(p), p


def state_file(sweep) -> object:
    return R.sweep_dir(sweep) / R.STATE_FILE


def run(sweep, path, **kw):
    return R.run_sweep(sweep, path, tracking_uri="sqlite:///unused.db", **kw)


def test_a_start_that_fails_before_tune_leaves_no_state_and_the_name_free(sweep, monkeypatch):
    import ray.tune

    s, p = sweep

    # e.g. a scheduler setting Tune asserts on, when the Tuner is built
    monkeypatch.setattr(ray.tune, "Tuner", tuner(init_error=AssertionError("grace_period must be <= max_t!")))
    with pytest.raises(AssertionError):
        run(s, p)
    assert not state_file(s).exists() and FakeRun.ended == ["FAILED"]

    def ray_fails(cpus):
        raise ConfigError("Ray did not start")

    import towerlab.train.ray_env

    monkeypatch.setattr(towerlab.train.ray_env, "init_ray", ray_fails)
    with pytest.raises(ConfigError, match="Ray did not start"):
        run(s, p)
    assert not state_file(s).exists()

    # the same name starts again, not "already exists: --resume"; the state file appears once Tune sets up
    monkeypatch.setattr(towerlab.train.ray_env, "init_ray", lambda cpus: None)
    seen = []

    def fit(run_config):
        seen.append(state_file(s).exists())
        tune_starts(run_config)
        seen.append(state_file(s).exists())
        return Results()

    monkeypatch.setattr(ray.tune, "Tuner", tuner(fit))
    summary = run(s, p)
    assert seen == [False, True] and summary.parent_run_id == "parent-1"
    assert json.loads(state_file(s).read_text())["parent_run_id"] == "parent-1"
    assert FakeRun.ended[-1] == "FINISHED"
    with pytest.raises(ConfigError, match="already exists.*--resume s1"):
        run(s, p)


def test_tune_failing_before_it_saved_state_frees_the_name_after_it_keeps_it(sweep, monkeypatch):
    import ray.tune

    s, p = sweep

    def fails_early(run_config):
        tune_starts(run_config)
        raise RuntimeError("first trial could not be placed")

    monkeypatch.setattr(ray.tune, "Tuner", tuner(fails_early))
    with pytest.raises(RuntimeError):
        run(s, p)
    # Tune's tuner.pkl is there, but no experiment state: nothing --resume could continue
    assert (R.sweep_dir(s) / "tuner.pkl").exists() and not state_file(s).exists()

    def fails_later(run_config):
        tune_starts(run_config)
        # Tune has saved its experiment state (what a restore reads besides tuner.pkl)
        (R.sweep_dir(s) / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(ray.tune, "Tuner", tuner(fails_later))
    with pytest.raises(KeyboardInterrupt):
        run(s, p)
    assert json.loads(state_file(s).read_text())["parent_run_id"] == "parent-1"  # --resume can continue it
    assert FakeRun.ended[-1] == "KILLED"


def test_resume_without_tune_state_or_with_a_corrupt_state_file_is_one_line(sweep, monkeypatch):
    s, p = sweep
    root = R.sweep_dir(s)
    root.mkdir(parents=True)
    with pytest.raises(ConfigError, match="no sweep 's1' to resume"):
        run(s, p, resume=True)
    state_file(s).write_text("{not json")
    with pytest.raises(ConfigError) as e:
        run(s, p, resume=True)
    assert "is not a readable towerlab sweep state" in str(e.value) and "\n" not in str(e.value)
    state_file(s).write_text(json.dumps({"parent_run_id": "p"}))
    with pytest.raises(ConfigError, match="is not a towerlab sweep state"):
        run(s, p, resume=True)
    state_file(s).write_text(json.dumps({"parent_run_id": "p", "sweep": {}}))
    with pytest.raises(ConfigError, match="has no Ray Tune state under .* to resume"):
        run(s, p, resume=True)
    (root / "tuner.pkl").write_bytes(b"")  # a Tuner was built, but the experiment never ran
    with pytest.raises(ConfigError, match="has no Ray Tune state under .* to resume"):
        run(s, p, resume=True)
    assert FakeRun.ended == []  # refused before any run was reopened
