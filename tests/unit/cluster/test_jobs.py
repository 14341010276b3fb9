"""What `towerlab submit` sends (no cluster needed): the staged working_dir and package, the entrypoint, the token
sources, and the one-line errors for a wrong address or tracking URI (Ray's real JobSubmissionClient against a
closed port)."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path
from importlib.metadata import version

import pytest

from towerlab.cli import main
from towerlab.config import ConfigError
from towerlab.cluster.jobs import (Jobs, build_spec, check_tracking_uri, pinned_requirements, read_token, staged,
                                  submission_id)


def _project(tmp_path):
    root = tmp_path / "proj"
    for rel in ("recipes/debug.yaml", "sweeps/s.yaml", ".git/HEAD", ".venv/bin/python", "data/digits/part-0.parquet",
                "results/run/ckpt", "mlruns/0/meta.yaml", "mlruns.db", "mlartifacts/1/a", "notes/data/keep.txt",
                "recipes/__pycache__/x.pyc", "platform/towerlab/__init__.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    return root


def _files(d):
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


def test_staged_working_dir_leaves_out_stores_data_and_results(tmp_path):
    root = _project(tmp_path)
    with staged(root) as (work, pkg):
        assert _files(work) == {"recipes/debug.yaml", "sweeps/s.yaml", "notes/data/keep.txt"}
        files = _files(pkg)
        # the package keeps its own data/ subpackage: only the project root's data/ is excluded
        assert {"__init__.py", "cli/__init__.py", "data/pipeline.py", "cluster/jobs.py"} <= files
        assert not any("__pycache__" in f for f in files)
        staging = work.parent
    assert not staging.exists()  # removed after the upload


def test_build_spec_entrypoint_and_env(tmp_path):
    root = _project(tmp_path)
    spec = build_spec("train", "debug", str(root / "recipes/debug.yaml"), ["train.steps=5", "name=a b"], root,
                      "http://mlflow:5000", now=0)
    assert spec.submission_id == "towerlab-train-debug-19700101-000000"
    assert shlex.split(spec.entrypoint) == ["python", "-m", "towerlab.cli", "train", "recipes/debug.yaml",
                                            "train.steps=5", "name=a b", "--tracking-uri", "http://mlflow:5000",
                                            "--no-progress"]
    assert spec.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "pip" not in spec.runtime_env  # the cluster image provides the dependencies by default
    sweep = build_spec("sweep", "Quick Start!", str(root / "sweeps/s.yaml"), [], root, "http://m:1", now=3661)
    assert sweep.submission_id == "towerlab-sweep-quick-start-19700101-010101"
    assert "--no-progress" not in sweep.entrypoint
    with pytest.raises(ConfigError, match="outside the project directory"):
        build_spec("train", "x", str(tmp_path / "elsewhere.yaml"), [], root, "http://m:1")


def test_pinned_requirements_match_installed_versions():
    pins = pinned_requirements()
    import ray
    import torch

    assert f"ray[data,default,train,tune]=={ray.__version__}" in pins
    assert f"torch=={torch.__version__}" in pins
    assert f"mlflow=={version('mlflow')}" in pins
    assert not any(p.startswith("pytest") for p in pins)  # test extras stay out
    assert len(pins) == len(set(pins))


def test_submission_id_is_readable():
    assert submission_id("train", "digits_clip", now=86400 * 365) == "towerlab-train-digits-clip-19710101-000000"


def test_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert read_token() is None
    f = tmp_path / "token"
    f.write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(f))
    assert read_token() == "abc"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert read_token() == "env"  # RAY_AUTH_TOKEN before RAY_AUTH_TOKEN_PATH, as in Ray
    g = tmp_path / "flag"
    g.write_text("flag")
    assert read_token(str(g)) == "flag"  # the flag wins
    with pytest.raises(ConfigError, match="does not exist"):
        read_token(str(tmp_path / "missing"))


@pytest.mark.parametrize("uri,match", [(None, "needs an MLflow tracking server"),
                                       ("sqlite:///x.db", "this machine's disk"), ("mlruns", "this machine's disk"),
                                       ("http://host:5000/?token=abc", "holds a credential")])
def test_tracking_uri_must_be_a_server_without_credentials(uri, match):
    with pytest.raises(ConfigError, match=match):
        check_tracking_uri(uri)
    assert check_tracking_uri("https://mlflow.example:443") == "https://mlflow.example:443"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_one_line(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    port = _closed_port()
    rc = main(["submit", "train", "recipes/debug.yaml", "--address", f"http://127.0.0.1:{port}",
               "--tracking-uri", "http://127.0.0.1:5000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"Ray dashboard at http://127.0.0.1:{port} is unreachable" in err and len(err.strip().splitlines()) <= 2
    with pytest.raises(ConfigError, match="GCS port"):
        Jobs("127.0.0.1:6379")


def test_recipe_typo_fails_before_contacting_the_cluster(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    rc = main(["submit", "train", "recipes/debug.yaml", "train.stepz=3", "--address", "http://127.0.0.1:1",
               "--tracking-uri", "http://127.0.0.1:5000"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "unreachable" not in err


PASSWORD = "hunter2-very-secret"
TOKEN = "hf_abcdefghijklmnop"


def _project_with_secrets(tmp_path, repo_root):
    """A project as people have them: a .gitignore, env and token files, local stores, data and results."""
    root = tmp_path / "proj"
    files = {
        "recipes/debug.yaml": (repo_root / "recipes/debug.yaml").read_text(),
        "sweeps/s.yaml": "x", "notes/data/keep.txt": "x", "README.md": "x",
        ".gitignore": "# mine\n/scratch/\n*.log\n!keep.log\n",
        "scratch/big.bin": "x", "train.log": "x", "keep.log": "x", "sub/.gitignore": "local.txt\n",
        "sub/local.txt": "x", "sub/shared.txt": "x",
        ".env": f"HF_TOKEN={TOKEN}", ".env.production": "x", "deploy/prod.env": "x", ".envrc": "x",
        "ray-token": TOKEN, ".ray-token": TOKEN, "secrets/api.token": TOKEN, "certs/tls.key": "x",
        "certs/tls.pem": "x", ".netrc": "x", ".aws/credentials": "x", "notes/id_rsa": "x",
        "mlruns.db": "x", "mlruns/0/meta.yaml": "x", "mlartifacts/1/a": "x", "runs/optuna.db": "x",
        "cache.sqlite": "x", "data/digits/part-0.parquet": "x", "results/run/ckpt": "x", ".venv/bin/python": "x",
        ".git/HEAD": "x", "platform/towerlab/__init__.py": "x", "recipes/__pycache__/x.pyc": "x",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


EXPECTED_UPLOAD = {"recipes/debug.yaml", "sweeps/s.yaml", "notes/data/keep.txt", "README.md", ".gitignore",
                   "keep.log", "sub/.gitignore", "sub/shared.txt"}


def test_staged_working_dir_honours_gitignore_and_never_carries_secrets_or_stores(tmp_path, repo_root):
    root = _project_with_secrets(tmp_path, repo_root)
    outside = tmp_path / "home" / ".aws" / "credentials"
    outside.parent.mkdir(parents=True)
    outside.write_text(TOKEN)
    (root / "creds-link").symlink_to(outside)  # a link out of the project: Ray's upload would follow it
    (root / "env-link").symlink_to(root / ".env")  # a link to an excluded file
    (root / "home-link").symlink_to(outside.parent, target_is_directory=True)
    (root / "README-link.md").symlink_to("README.md")  # a link inside the project: its content goes
    with staged(root) as (work, pkg):
        assert _files(work) == EXPECTED_UPLOAD | {"README-link.md"}
        assert not (work / "README-link.md").is_symlink()
        assert not any(TOKEN in p.read_text() for p in work.rglob("*") if p.is_file())
        assert {"config/secrets.py", "data/pipeline.py"} <= _files(pkg)


def test_overrides_with_credentials_travel_in_the_environment_not_the_entrypoint(tmp_path):
    root = _project(tmp_path)
    spec = build_spec("train", "debug", str(root / "recipes/debug.yaml"),
                      ["train.steps=5", f"data.path=s3://bucket/shards?token={TOKEN}",
                       f"presets.x.hub.password={PASSWORD}"],
                      root, f"http://alice:{PASSWORD}@mlflow:5000", now=0)
    args = shlex.split(spec.entrypoint)
    assert PASSWORD not in spec.entrypoint and TOKEN not in spec.entrypoint
    assert args[5:8] == ["train.steps=5", "data.path=${oc.env:TOWERLAB_SECRET_DATA_PATH}",
                         "presets.x.hub.password=${oc.env:TOWERLAB_SECRET_PRESETS_X_HUB_PASSWORD}"]
    assert args[8:10] == ["--tracking-uri", "http://mlflow:5000"]
    env = spec.runtime_env["env_vars"]
    assert env["TOWERLAB_SECRET_DATA_PATH"] == f"s3://bucket/shards?token={TOKEN}"
    assert env["TOWERLAB_SECRET_PRESETS_X_HUB_PASSWORD"] == PASSWORD
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("alice", PASSWORD)
    assert PASSWORD not in str(spec.metadata)


def test_the_interpolated_override_loads_back_on_the_cluster(tmp_path, monkeypatch, repo_root):
    """What the job runs: the entrypoint's `${oc.env:...}` override, with the job's env_vars set, gives the value."""
    from towerlab.train.recipe import load_recipe

    root = _project(tmp_path)
    spec = build_spec("train", "debug", str(root / "recipes/debug.yaml"),
                      [f"tracking.uri=http://bob:{PASSWORD}@mlflow:5000"], root, "http://mlflow:5000")
    for k, v in spec.runtime_env["env_vars"].items():
        monkeypatch.setenv(k, v)
    override = shlex.split(spec.entrypoint)[5]
    assert override == "tracking.uri=${oc.env:TOWERLAB_SECRET_TRACKING_URI}"
    assert load_recipe(repo_root / "recipes/debug.yaml", [override]).tracking.uri == \
        f"http://bob:{PASSWORD}@mlflow:5000"


def test_submit_uploads_the_filtered_project_and_a_clean_entrypoint(tmp_path, repo_root, monkeypatch, capsys):
    """`towerlab submit` end to end against Ray's client class replaced by a recorder: what reaches the cluster."""
    import ray.job_submission

    seen = {}

    class Recorder:
        def __init__(self, address, headers=None):
            seen["address"], seen["headers"] = address, headers

        def submit_job(self, entrypoint, submission_id, runtime_env, metadata):
            seen.update(entrypoint=entrypoint, runtime_env=runtime_env,
                        files=_files(Path(runtime_env["working_dir"])))
            return submission_id

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Recorder)
    monkeypatch.setattr(Jobs, "_probe", lambda self, headers: None)  # the fake cluster's dashboard answers
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    root = _project_with_secrets(tmp_path, repo_root)
    monkeypatch.chdir(root)
    rc = main(["submit", "train", "recipes/debug.yaml", "train.steps=3", f"tracking.uri=http://u:{PASSWORD}@m:5000",
               "--address", "http://127.0.0.1:8265", "--tracking-uri", f"http://alice:{PASSWORD}@mlflow:5000"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert seen["files"] == EXPECTED_UPLOAD
    assert PASSWORD not in seen["entrypoint"] and PASSWORD not in out.out + out.err
    assert "tracking.uri=${oc.env:TOWERLAB_SECRET_TRACKING_URI}" in seen["entrypoint"]
    assert "--tracking-uri http://mlflow:5000" in seen["entrypoint"]
    env = seen["runtime_env"]["env_vars"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    assert env["TOWERLAB_SECRET_TRACKING_URI"] == f"http://u:{PASSWORD}@m:5000"


def test_job_logs_and_listings_are_shown_redacted(monkeypatch, capsys):
    """A job's own output or another client's entrypoint may hold a credential: the console never shows it."""
    import ray.job_submission
    from types import SimpleNamespace

    class Cluster:
        def __init__(self, address, headers=None):
            pass

        def get_job_logs(self, job):
            return f"connecting to http://alice:{PASSWORD}@mlflow:5000\nerror: bad token={TOKEN}\n"

        def list_jobs(self):
            return [SimpleNamespace(submission_id="j1", job_id=None, start_time=None, entrypoint=(
                f"python train.py --uri http://u:{PASSWORD}@h"), status=SimpleNamespace(value="RUNNING"))]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Cluster)
    monkeypatch.setattr(Jobs, "_probe", lambda self, headers: None)  # the fake cluster's dashboard answers
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["jobs", "logs", "j1", "--address", "http://127.0.0.1:8265"]) == 0
    assert main(["jobs", "ls", "--address", "http://127.0.0.1:8265"]) == 0
    out = capsys.readouterr().out
    assert "connecting to http://***@mlflow:5000" in out and "token=***" in out and "http://***@h" in out
    assert PASSWORD not in out and TOKEN not in out


def test_submit_refuses_a_token_in_the_tracking_uri_query_in_one_line(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    rc = main(["submit", "train", "recipes/debug.yaml", "--address", "http://127.0.0.1:1",
               "--tracking-uri", f"http://mlflow:5000/?token={TOKEN}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: tracking URI http://mlflow:5000/?token=*** holds a credential")
    assert len(err.strip().splitlines()) == 1 and TOKEN not in err and "Traceback" not in err
