"""The cluster commands of `towerlab`: `submit train|sweep` and `jobs ls|logs|stop` (Ray Jobs API), `k8s
render|validate` (KubeRay manifests). Registered in cli.py's parser by `add_parsers`; kept apart from cli.py
because they validate recipes and sweeps here (the cli layer) before handing plain values to towerlab.launch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from towerlab.config import ConfigError

console = Console()
err = Console(stderr=True)


def _load(kind: str, file: str, overrides: list[str]):
    """The recipe or sweep, validated here so a typo fails before anything reaches the cluster: (name, tracking)."""
    if kind == "train":
        from towerlab.train.recipe import load_recipe

        r = load_recipe(file, overrides)
        return r.name, r.tracking.uri
    from towerlab.sweep.load import load_sweep

    s = load_sweep(file, overrides)
    return s.name, s.tracking.uri


def cmd_submit(args: argparse.Namespace) -> int:
    import os

    from towerlab.launch.jobs import Jobs, build_spec, check_tracking_uri

    project = Path(args.project_dir).resolve()
    name, recipe_uri = _load(args.kind, args.file, args.overrides)
    if args.kind == "sweep":  # the sweep's recipe must travel with the job too
        from towerlab.launch.jobs import relative_to_project
        from towerlab.sweep.load import load_sweep, recipe_path

        relative_to_project(recipe_path(load_sweep(args.file, args.overrides), args.file), project, "the recipe")
    uri = check_tracking_uri(args.tracking_uri or recipe_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    spec = build_spec(args.kind, name, args.file, args.overrides, project, uri, pip=args.pip)
    jobs = Jobs(args.address, args.token_file)
    sid = jobs.submit(spec, project)
    console.print(f"submitted [cyan]{sid}[/] to {jobs.address}: {spec.entrypoint}", highlight=False, soft_wrap=True)
    if not args.follow:
        console.print(f"follow: towerlab jobs logs {sid} --follow --address {jobs.address}", highlight=False,
                      soft_wrap=True)
        return 0
    return _follow(jobs, sid)


def _follow(jobs, sid: str) -> int:
    try:
        status = jobs.follow(sid)
    except KeyboardInterrupt:
        err.print(f"stopped following; the job goes on (towerlab jobs stop {sid})", highlight=False)
        return 130
    if status == "SUCCEEDED":
        console.print(f"job {sid} SUCCEEDED", highlight=False)
        return 0
    message = (jobs.info(sid).message or "").strip().splitlines()
    err.print(f"[red]error:[/] job {sid} {status}: {message[0] if message else 'no message'} "
              f"(logs: towerlab jobs logs {sid})", highlight=False, soft_wrap=True)
    return 1


def cmd_jobs_ls(args: argparse.Namespace) -> int:
    from towerlab.launch.jobs import Jobs

    t = Table("submission id", "status", "started (UTC)", "entrypoint")
    for j in Jobs(args.address, args.token_file).list():
        start = dt.datetime.fromtimestamp(j.start_time / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") \
            if j.start_time else "-"
        t.add_row(j.submission_id or j.job_id or "-", str(j.status.value), start, j.entrypoint)
    console.print(t)
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from towerlab.launch.jobs import Jobs

    jobs = Jobs(args.address, args.token_file)
    if args.follow:
        return _follow(jobs, args.id)
    sys.stdout.write(jobs.logs(args.id))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from towerlab.launch.jobs import Jobs

    jobs = Jobs(args.address, args.token_file)
    stopped = jobs.stop(args.id)
    console.print(f"job {args.id}: " + ("stop requested" if stopped else
                                        f"already {jobs.info(args.id).status.value}"), highlight=False)
    return 0


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (else RAY_API_SERVER_ADDRESS)")
    p.add_argument("--token-file", help="file holding Ray's auth token (else RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH)")


def add_parsers(sub) -> None:
    """Register `submit`, `jobs` and `k8s` under the top-level parser's subcommands."""
    s = sub.add_parser("submit", help="run a training or sweep on a Ray cluster (Ray Jobs API)")
    ssub = s.add_subparsers(dest="kind", required=True)
    for kind, what in (("train", "recipe YAML file"), ("sweep", "sweep YAML file")):
        k = ssub.add_parser(kind, help=f"submit `towerlab {kind} FILE`")
        k.add_argument("file", help=what)
        k.add_argument("overrides", nargs="*", help="dotted overrides, as for `towerlab " + kind + "`")
        _cluster_flags(k)
        k.add_argument("--tracking-uri", help="MLflow server the cluster reaches (else recipe, MLFLOW_TRACKING_URI)")
        k.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit with its status")
        k.add_argument("--pip", action="store_true",
                       help="install towerlab's dependencies pinned to this environment's versions in the job "
                            "(default: the cluster image provides them)")
        k.add_argument("--project-dir", default=".", help="project directory uploaded as the job's working_dir")
        k.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list, follow or stop jobs on a Ray cluster")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    ls = jsub.add_parser("ls", help="jobs, newest first")
    _cluster_flags(ls)
    ls.set_defaults(func=cmd_jobs_ls)
    lg = jsub.add_parser("logs", help="a job's logs")
    lg.add_argument("id", help="submission id (towerlab-train-...)")
    lg.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    _cluster_flags(lg)
    lg.set_defaults(func=cmd_jobs_logs)
    st = jsub.add_parser("stop", help="stop a job")
    st.add_argument("id", help="submission id")
    _cluster_flags(st)
    st.set_defaults(func=cmd_jobs_stop)
