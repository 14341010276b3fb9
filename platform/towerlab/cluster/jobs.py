"""Submitting `towerlab train` and `towerlab sweep` to a running Ray cluster through Ray's Jobs API, and following,
listing and stopping those jobs.

What a job carries (its runtime_env):
- working_dir: the project directory (recipes, sweeps, ...) without .git, .venv, MLflow stores (mlruns*,
  mlartifacts), data/ and results/; the towerlab package itself goes as a py_module, so the code that runs on the
  cluster is exactly the code that submitted it (it comes first on the workers' PYTHONPATH).
  Both are staged in a temporary directory first: Ray applies one `excludes` list to the working_dir and to every
  py_module, so an exclude of data/ would also drop towerlab/data/ from the package.
- dependencies: by default the cluster's image provides them (torch, DeepSpeed, ray[default] are large; installing
  them per job costs minutes); `pip=True` adds towerlab's dependencies pinned to the versions installed here.
- MLFLOW_TRACKING_URI and --tracking-uri: explicit, so the job never falls back to a store on the cluster's disk.
Authentication: Ray's token, from --token-file, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, sent as
`Authorization: Bearer` on every request (Ray's SDK adds it itself only when RAY_AUTH_MODE=token is set locally).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from towerlab.config import ConfigError

# Ignored at the project root (anchored: towerlab/data/ is a package, not a dataset).
EXCLUDED_ROOT = (".git", ".venv", "data", "results", "mlartifacts", "platform")
EXCLUDED_ANYWHERE = ("mlruns*", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    """What `towerlab submit` sends: the command run on the cluster and its runtime_env."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict = field(default_factory=dict)


def submission_id(kind: str, name: str, now: float | None = None) -> str:
    """towerlab-<train|sweep>-<name>-<UTC time>: readable in `towerlab jobs ls` and the Ray dashboard."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
    return f"towerlab-{kind}-{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def read_token(token_file: str | None = None) -> str | None:
    """Ray's auth token: --token-file, else RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH; None when none is given."""
    path = token_file or (None if os.environ.get("RAY_AUTH_TOKEN") else os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"Ray token file {p} does not exist: pass --token-file PATH (the token the cluster "
                              "was started with) or set RAY_AUTH_TOKEN")
        token = p.read_text().strip()
        if not token:
            raise ConfigError(f"Ray token file {p} is empty")
        return token
    return os.environ.get("RAY_AUTH_TOKEN") or None


def check_tracking_uri(uri: str | None) -> str:
    """A job writes to a tracking server the cluster can reach; credentials stay out of the (visible) job spec."""
    if not uri:
        raise ConfigError("a job on a Ray cluster needs an MLflow tracking server: pass --tracking-uri "
                          "http://MLFLOW:5000, set tracking.uri in the recipe, or MLFLOW_TRACKING_URI")
    p = urlparse(uri)
    if p.scheme in ("", "file", "sqlite"):
        raise ConfigError(f"tracking URI {uri} is a store on this machine's disk, which the cluster's nodes do not "
                          "share: pass --tracking-uri http://MLFLOW:5000 (a tracking server the cluster reaches)")
    if p.username or p.password:
        raise ConfigError("the tracking URI holds credentials, which every dashboard user could read in the job "
                          "spec: give the URI without user:password@ and set MLFLOW_TRACKING_USERNAME/PASSWORD on "
                          "the cluster (a Kubernetes Secret)")
    return uri


def pinned_requirements() -> list[str]:
    """towerlab's dependencies pinned to the versions installed here (the environment that was tested)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    out = []
    for line in requires("towerlab") or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue  # test-only extras
        try:
            v = version(req.name)
        except PackageNotFoundError:
            raise ConfigError(f"dependency {req.name} is not installed here, so it cannot be pinned: install it or "
                              "submit without --pip (the cluster image then provides the dependencies)") from None
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}=={v}")
    return out


def package_dir() -> Path:
    import towerlab

    return Path(towerlab.__file__).resolve().parent


def _ignore_at(root: Path) -> Callable[[str, list[str]], set[str]]:
    import fnmatch

    def ignore(directory: str, names: list[str]) -> set[str]:
        drop = {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in EXCLUDED_ANYWHERE)}
        if Path(directory).resolve() == root:
            drop |= {n for n in names if n in EXCLUDED_ROOT}
        return drop

    return ignore


@contextmanager
def staged(project: Path) -> Iterator[tuple[Path, Path]]:
    """(working_dir, towerlab package) copies without what a job must not carry; removed afterwards."""
    project = project.resolve()
    with tempfile.TemporaryDirectory(prefix="towerlab-submit-") as tmp:
        work = Path(tmp) / "project"
        shutil.copytree(project, work, ignore=_ignore_at(project), symlinks=True)
        pkg = Path(tmp) / "modules" / "towerlab"
        shutil.copytree(package_dir(), pkg, ignore=shutil.ignore_patterns(*EXCLUDED_ANYWHERE))
        yield work, pkg


def relative_to_project(path: str | os.PathLike, project: Path, what: str) -> str:
    p = Path(path).resolve()
    if not p.is_relative_to(project.resolve()):
        raise ConfigError(f"{what} {path} is outside the project directory {project} that is uploaded with the job: "
                          "move it into the project or pass --project-dir")
    return p.relative_to(project.resolve()).as_posix()


def build_spec(kind: str, name: str, file: str, overrides: list[str], project: Path, tracking_uri: str,
               pip: bool = False, now: float | None = None) -> JobSpec:
    """The job for `towerlab <kind> FILE overrides` run from the project's root on the cluster."""
    rel = relative_to_project(file, project, "the recipe" if kind == "train" else "the sweep file")
    args = ["python", "-m", "towerlab.cli", kind, rel, *overrides, "--tracking-uri", tracking_uri]
    if kind == "train":
        args.append("--no-progress")
    env: dict = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}}
    if pip:
        env["pip"] = pinned_requirements()
    sid = submission_id(kind, name, now)
    return JobSpec(sid, shlex.join(args), env, {"towerlab.kind": kind, "towerlab.name": name, "towerlab.file": rel})


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        raise ConfigError("give the cluster's dashboard address: --address http://HEAD:8265 (or set "
                          "RAY_API_SERVER_ADDRESS)")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: the Jobs API is the dashboard's HTTP address, e.g. "
                          "http://HEAD:8265 (not the GCS port 6379)")
    return address.rstrip("/")


class Jobs:
    """A connection to a cluster's Jobs API that turns Ray's exceptions into one-line ConfigErrors."""

    def __init__(self, address: str | None, token_file: str | None = None):
        self.address = _address(address)
        # Ray's SDK prefers RAY_API_SERVER_ADDRESS over the address it is given: make it the one chosen here
        os.environ["RAY_API_SERVER_ADDRESS"] = self.address
        token = read_token(token_file)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with self._errors():
            import logging

            from ray.job_submission import JobSubmissionClient

            # not Ray's "uploading package" and "websocket closed" lines (its SDK loggers are set to INFO)
            for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextmanager
    def _errors(self, job: str | None = None) -> Iterator[None]:
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            why = "has no token" if "required" in str(e).split("\n")[0].lower() else "rejected the token"
            raise ConfigError(f"Ray cluster at {self.address} {why}: pass --token-file PATH or set RAY_AUTH_TOKEN "
                              "to the token the cluster was started with") from None
        except ConnectionError as e:
            raise ConfigError(f"Ray dashboard at {self.address} is unreachable ({type(e).__name__}): check the "
                              "address (http://HEAD:8265) and that the cluster runs with ray[default]") from None
        except RuntimeError as e:
            text = str(e)
            if job and ("404" in text or "does not exist" in text):
                raise ConfigError(f"no job '{job}' on {self.address}: see `towerlab jobs ls`") from None
            raise ConfigError(f"Ray Jobs API at {self.address}: {text.splitlines()[0][:300]}") from None

    def submit(self, spec: JobSpec, project: Path) -> str:
        with staged(project) as (work, pkg), self._errors():
            runtime_env = {**spec.runtime_env, "working_dir": str(work), "py_modules": [str(pkg)]}
            return self.client.submit_job(entrypoint=spec.entrypoint, submission_id=spec.submission_id,
                                          runtime_env=runtime_env, metadata=spec.metadata)

    def list(self) -> list:
        with self._errors():
            jobs = self.client.list_jobs()
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def info(self, job: str):
        with self._errors(job):
            return self.client.get_job_info(job)

    def logs(self, job: str) -> str:
        with self._errors(job):
            return self.client.get_job_logs(job)

    def stop(self, job: str) -> bool:
        with self._errors(job):
            return self.client.stop_job(job)

    def follow(self, job: str, out=sys.stdout, poll: float = 1.0) -> str:
        """Stream the job's logs until it ends; its final status."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job):
                out.write(chunk)
                out.flush()

        with self._errors(job):
            self.client.get_job_info(job)  # a missing job is an error here, not an endless wait
            try:
                asyncio.run(tail())
            except RuntimeError:
                pass  # the websocket dropped: the status below decides
            while True:  # the log stream can close a moment before the status turns terminal
                status = str(self.client.get_job_status(job).value)
                if status in TERMINAL:
                    return status
                time.sleep(poll)
