"""Submitting `towerlab train` and `towerlab sweep` to a running Ray cluster through Ray's Jobs API, and following,
listing and stopping those jobs.

What a job carries (its runtime_env):
- working_dir: the project directory (recipes, sweeps, ...) without what its .gitignore files ignore and without
  what a job must never carry whatever .gitignore says (EXCLUDES: .git, .venv, environment files, token and key
  files, MLflow stores and databases, data/ and results/); the towerlab package itself goes as a py_module, so the
  code that runs on the cluster is exactly the code that submitted it (it comes first on the workers' PYTHONPATH).
  Both are staged in a temporary directory first: Ray applies one `excludes` list to the working_dir and to every
  py_module, so an exclude of data/ would also drop towerlab/data/ from the package. Matching is gitignore's, by
  the pathspec copy Ray itself uses for `excludes` and .gitignore.
- dependencies: by default the cluster's image provides them (torch, DeepSpeed, ray[default] are large; installing
  them per job costs minutes); `pip=True` adds towerlab's dependencies pinned to the versions installed here.
- MLFLOW_TRACKING_URI and --tracking-uri: explicit, so the job never falls back to a store on the cluster's disk.
- Credentials: the entrypoint is shown to every dashboard user (`jobs ls`, the Jobs page), so none goes there. A
  tracking URI's user:password@ becomes MLFLOW_TRACKING_USERNAME/PASSWORD (which MLflow reads), and an override
  whose value is a credential (config/secrets.py decides) becomes `KEY=${oc.env:TOWERLAB_SECRET_KEY}` with the
  value in the job's env_vars, resolved by the recipe loader on the cluster.
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
from typing import Iterator
from urllib.parse import unquote, urlparse

from towerlab.config import ConfigError
from towerlab.config.secrets import has_credentials, redact_text, redact_uri

# Never uploaded, whatever .gitignore says (gitignore patterns). Anchored ones are the project root's only:
# towerlab/data/ is a package, not a dataset; platform/ travels as the py_module.
EXCLUDED_ROOT = ("/data/", "/results/", "/mlartifacts/", "/platform/")
EXCLUDED_ANYWHERE = (
    ".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", ".pytest_cache/", "*.egg-info/",
    # environment files: .env, .env.local, prod.env
    ".env", ".env.*", "*.env", ".envrc",
    # tokens, keys and credential stores
    "token", ".token", "*.token", "*-token", "*_token", "*token.txt", ".ray-token", "*.pem", "*.key", "*.p12",
    "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", ".netrc", ".git-credentials", ".pypirc", ".npmrc",
    "credentials", "credentials.*", ".aws/", ".ssh/", ".gnupg/", ".docker/config.json", ".kube/",
    # MLflow stores and databases
    "mlruns*", "*.db", "*.db-journal", "*.db-wal", "*.sqlite", "*.sqlite3",
)
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
    """A job writes to a tracking server the cluster can reach (its user:password@, if any, is moved into the job's
    environment by build_spec)."""
    if not uri:
        raise ConfigError("a job on a Ray cluster needs an MLflow tracking server: pass --tracking-uri "
                          "http://MLFLOW:5000, set tracking.uri in the recipe, or MLFLOW_TRACKING_URI")
    p = urlparse(uri)
    if p.scheme in ("", "file", "sqlite"):
        raise ConfigError(f"tracking URI {redact_uri(uri)} is a store on this machine's disk, which the cluster's "
                          "nodes do not share: pass --tracking-uri http://MLFLOW:5000 (a tracking server the cluster "
                          "reaches)")
    if has_credentials(split_credentials(uri)[0]):
        raise ConfigError(f"tracking URI {redact_uri(uri)} holds a credential in its query, which every dashboard "
                          "user could read in the job spec: give the URI without it and set MLFLOW_TRACKING_TOKEN "
                          "on the cluster (a Kubernetes Secret)")
    return uri


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without user:password@, MLflow's environment variables for them)."""
    p = urlparse(uri)
    if not (p.username or p.password):
        return uri, {}
    env = {"MLFLOW_TRACKING_USERNAME": unquote(p.username or "")}
    if p.password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = unquote(p.password)
    return p._replace(netloc=p.netloc.rpartition("@")[2]).geturl(), env


def secret_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(overrides safe to show, env_vars): an override whose value is a credential is replaced by an interpolation
    of an environment variable that holds it (`${oc.env:...}`, resolved by the recipe loader on the cluster)."""
    shown, env = [], {}
    for o in overrides:
        key, _, value = o.partition("=")
        if value and has_credentials(value, key):
            var = "TOWERLAB_SECRET_" + re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_").upper()
            env[var] = value
            shown.append(f"{key}=${{oc.env:{var}}}")
        else:
            shown.append(o)
    return shown, env


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


def _spec(lines):
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to `excludes` and .gitignore

    return PathSpec.from_lines("gitwildmatch", [line.rstrip("\n") for line in lines])


def _copy_filtered(src: Path, dst: Path, patterns: tuple[str, ...], gitignore: bool) -> None:
    """Copy src to dst without what the patterns (and, when asked, every .gitignore under src) exclude.
    Ray's upload follows symlinks, so none is copied as a link: a linked file is copied by content when its target
    is inside src and not excluded itself (a link to ~/.aws/credentials or to .env uploads nothing), and linked
    directories are left out (no loops, nothing from outside)."""
    src = src.resolve()
    fixed = _spec(patterns)
    ignores: list[tuple[Path, object]] = []  # (directory, its .gitignore's spec)

    def excluded(path: Path, is_dir: bool) -> bool:
        rel = path.relative_to(src).as_posix() + ("/" if is_dir else "")
        if fixed.match_file(rel):
            return True
        return any(path.is_relative_to(base) and spec.match_file(path.relative_to(base).as_posix() +
                                                                   ("/" if is_dir else ""))
                   for base, spec in ignores)

    def allowed(path: Path, is_dir: bool) -> bool:
        if excluded(path, is_dir):
            return False
        if path.is_symlink():
            target = path.resolve()
            return not is_dir and target.is_file() and target.is_relative_to(src) and not excluded(target, False)
        return True

    dst.mkdir(parents=True)
    for directory, dirs, files in os.walk(src):
        here = Path(directory)
        if gitignore and (here / ".gitignore").is_file():
            ignores.append((here, _spec((here / ".gitignore").read_text(errors="replace").splitlines())))
        out = dst / here.relative_to(src)
        dirs[:] = [d for d in sorted(dirs) if allowed(here / d, is_dir=True)]  # os.walk descends into these only
        for d in dirs:
            (out / d).mkdir()
        for f in sorted(files):
            if allowed(here / f, is_dir=False):
                shutil.copy2(here / f, out / f)  # follows a (vetted) link: the upload holds the content


@contextmanager
def staged(project: Path) -> Iterator[tuple[Path, Path]]:
    """(working_dir, towerlab package) copies without what a job must not carry; removed afterwards."""
    project = project.resolve()
    with tempfile.TemporaryDirectory(prefix="towerlab-submit-") as tmp:
        work = Path(tmp) / "project"
        _copy_filtered(project, work, EXCLUDED_ROOT + EXCLUDED_ANYWHERE, gitignore=True)
        pkg = Path(tmp) / "modules" / "towerlab"
        _copy_filtered(package_dir(), pkg, EXCLUDED_ANYWHERE, gitignore=False)
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
    tracking_uri, env_vars = split_credentials(tracking_uri)
    shown, secret_env = secret_overrides(list(overrides))
    args = ["python", "-m", "towerlab.cli", kind, rel, *shown, "--tracking-uri", tracking_uri]
    if kind == "train":
        args.append("--no-progress")
    env: dict = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1", **env_vars,
                              **secret_env}}
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
        raise ConfigError(f"--address {redact_uri(address)}: the Jobs API is the dashboard's HTTP address, e.g. "
                          "http://HEAD:8265 (not the GCS port 6379)")
    return address.rstrip("/")


PROBE_TIMEOUT_S = 5.0  # for connecting to the dashboard, and again for its answer


class Jobs:
    """A connection to a cluster's Jobs API that turns Ray's exceptions into one-line ConfigErrors."""

    def __init__(self, address: str | None, token_file: str | None = None):
        self.address = _address(address)
        self.shown = redact_uri(self.address)  # for messages
        # Ray's SDK prefers RAY_API_SERVER_ADDRESS over the address it is given: make it the one chosen here
        os.environ["RAY_API_SERVER_ADDRESS"] = self.address
        token = read_token(token_file)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._probe(headers)
        with self._errors():
            import logging

            from ray.job_submission import JobSubmissionClient

            # not Ray's "uploading package" and "websocket closed" lines (its SDK loggers are set to INFO)
            for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self.client = JobSubmissionClient(self.address, headers=headers)

    def _probe(self, headers: dict[str, str]) -> None:
        """Ray's SDK asks the dashboard for its version without a timeout: a server that accepts and never answers
        would hang the command. Ask first with one; an answer that is not a Ray dashboard's is one line too."""
        import requests

        try:
            resp = requests.get(f"{self.address}/api/version", headers=headers, timeout=PROBE_TIMEOUT_S)
        except requests.Timeout:
            raise ConfigError(f"Ray dashboard at {self.shown} did not answer within {PROBE_TIMEOUT_S:g} s: check "
                              "the address (http://HEAD:8265)") from None
        except requests.RequestException as e:
            raise ConfigError(f"Ray dashboard at {self.shown} is unreachable ({type(e).__name__}): check the "
                              "address (http://HEAD:8265) and that the cluster runs with ray[default]") from None
        if resp.status_code in (401, 403):
            return  # the SDK names the token problem
        try:
            ok = resp.ok and "ray_version" in resp.json()
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{self.shown} is not a Ray dashboard (GET /api/version: HTTP {resp.status_code}): "
                              "give the dashboard's address, e.g. http://HEAD:8265")

    @contextmanager
    def _errors(self, job: str | None = None) -> Iterator[None]:
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            why = "has no token" if "required" in str(e).split("\n")[0].lower() else "rejected the token"
            raise ConfigError(f"Ray cluster at {self.shown} {why}: pass --token-file PATH or set RAY_AUTH_TOKEN "
                              "to the token the cluster was started with") from None
        except ConnectionError as e:
            raise ConfigError(f"Ray dashboard at {self.shown} is unreachable ({type(e).__name__}): check the "
                              "address (http://HEAD:8265) and that the cluster runs with ray[default]") from None
        except RuntimeError as e:
            text = str(e)
            if job and ("404" in text or "does not exist" in text):
                raise ConfigError(f"no job '{job}' on {self.shown}: see `towerlab jobs ls`") from None
            raise ConfigError(f"Ray Jobs API at {self.shown}: {redact_text(text.splitlines()[0][:300])}") from None

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
                out.write(redact_text(chunk))  # the job's output may echo a credential
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
