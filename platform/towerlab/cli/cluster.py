"""The cluster commands of `towerlab`: `submit train|sweep` and `jobs ls|logs|stop` (Ray Jobs API), `k8s
render|validate` (KubeRay manifests). Recipes and sweeps are validated here, before anything reaches the cluster; towerlab.cluster gets plain values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from rich.table import Table

from towerlab.cli import console, err
from towerlab.config import ConfigError
from towerlab.config.secrets import redact_text
from towerlab.util import atomic_write


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
    from towerlab.cluster.jobs import Jobs, build_spec, check_tracking_uri

    project = Path(args.project_dir).resolve()
    name, recipe_uri = _load(args.kind, args.file, args.overrides)
    if args.kind == "sweep":  # the sweep's recipe must travel with the job too
        from towerlab.cluster.jobs import relative_to_project
        from towerlab.sweep.load import load_sweep, recipe_path

        relative_to_project(recipe_path(load_sweep(args.file, args.overrides), args.file), project, "the recipe")
    uri = check_tracking_uri(args.tracking_uri or recipe_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    spec = build_spec(args.kind, name, args.file, args.overrides, project, uri, pip=args.pip)
    jobs = Jobs(args.address, args.token_file)
    if args.kind == "train":  # once the cluster answered: a refused submit is its one error line
        _warn_node_local_paths(args.file, args.overrides)
    sid = jobs.submit(spec, project)
    console.print(f"submitted [cyan]{sid}[/] to {jobs.shown}: {spec.entrypoint}", highlight=False, soft_wrap=True)
    if not args.follow:
        console.print(f"follow: towerlab jobs logs {sid} --follow --address {jobs.shown}", highlight=False,
                      soft_wrap=True)
        return 0
    return _follow(jobs, sid)


def _warn_node_local_paths(file: str, overrides: list[str]) -> None:
    """Relative paths resolve inside the job's working_dir, which each node unpacks on its own disk: data and
    checkpoints there are not seen by the other nodes. Legitimate on a one-node cluster, so a warning."""
    from towerlab.train.recipe import load_recipe

    r = load_recipe(file, overrides)
    local = [f"{k}={v}" for k, v in (("data.path", r.data.path), ("train.storage_path", r.train.storage_path))
             if v and "://" not in v and not Path(v).is_absolute()]
    if local:
        err.print(f"warning: {redact_text(', '.join(local))} relative: on the cluster this is inside the job's "
                  "working_dir on one node; give paths on storage every node shares (NFS mount, s3://...)",
                  highlight=False, soft_wrap=True)


def _follow(jobs, sid: str) -> int:
    try:
        status = jobs.follow(sid)
    except KeyboardInterrupt:
        err.print(f"stopped following; the job goes on (towerlab jobs stop {sid})", highlight=False)
        return 130
    if status == "SUCCEEDED":
        console.print(f"job {sid} SUCCEEDED", highlight=False)
        return 0
    err.print(f"[red]error:[/] job {sid} {status}: {failure_line(jobs, sid)} (logs: towerlab jobs logs {sid})",
              highlight=False, soft_wrap=True)
    return 1


def failure_line(jobs, sid: str) -> str:
    """Why a job failed, in one line: towerlab's own `error:` line, else the last exception, else Ray's message."""
    import re

    lines = [line.strip() for line in jobs.logs(sid).splitlines() if line.strip()]
    for pattern in (r"^error: ", r"^[\w.]*(Error|Exception|Interrupt)\b.*: "):
        hits = [line for line in lines if re.match(pattern, line)]
        if hits:
            return redact_text(hits[-1][:400])
    message = (jobs.info(sid).message or "").strip().splitlines()
    return redact_text(message[0]) if message else "no message"


def cmd_jobs_ls(args: argparse.Namespace) -> int:
    from towerlab.cluster.jobs import Jobs

    t = Table(title="jobs, newest first")
    for col in ("submission id", "status", "started (UTC)"):  # whole, so an id can be copied into `jobs logs|stop`
        t.add_column(col, no_wrap=True)
    t.add_column("entrypoint", overflow="fold")
    for j in Jobs(args.address, args.token_file).list():
        start = dt.datetime.fromtimestamp(j.start_time / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") \
            if j.start_time else "-"
        t.add_row(j.submission_id or j.job_id or "-", str(j.status.value), start, redact_text(j.entrypoint or ""))
    console.print(t)
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from towerlab.cluster.jobs import Jobs

    jobs = Jobs(args.address, args.token_file)
    if args.follow:
        return _follow(jobs, args.id)
    sys.stdout.write(redact_text(jobs.logs(args.id)))  # the job's output may echo a credential
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from towerlab.cluster.jobs import Jobs

    jobs = Jobs(args.address, args.token_file)
    stopped = jobs.stop(args.id)
    console.print(f"job {args.id}: " + ("stop requested" if stopped else
                                        f"already {jobs.info(args.id).status.value}"), highlight=False)
    return 0


def cmd_k8s_render(args: argparse.Namespace) -> int:
    from towerlab.config import read_yaml
    from towerlab.cluster.jobs import relative_to_project
    from towerlab.cluster.k8s.render import K8sOptions, check_no_credentials, default_image, render_sweep, \
        render_train, to_yaml, train_overrides

    if args.nodes < 1 or args.gpus_per_node < 0:
        raise ConfigError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: need at least 1 node and "
                          "0 or more GPUs per node")
    _check_k8s_flags(args)
    project = Path(args.project_dir).resolve()
    rel = relative_to_project(args.file, project, "the recipe or sweep")
    o = K8sOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   image=args.image or default_image(gpu=args.gpus_per_node > 0), overrides=list(args.overrides))
    for key in ("cpus_per_node", "memory_per_node", "namespace", "tracking_uri", "storage", "redis_address",
                "ttl_seconds"):
        if getattr(args, key) is not None:
            setattr(o, key, getattr(args, key))
    check_no_credentials(o)  # before anything is loaded or printed
    if not o.storage.startswith(("pvc://", "s3://", "gs://", "abfss://")):
        raise ConfigError(f"--storage {o.storage}: give pvc://CLAIM (a ReadWriteMany PersistentVolumeClaim) or an "
                          "object store URI (s3://, gs://, abfss://) that every node shares")
    raw = read_yaml(args.file)
    if "recipe" in raw:  # a sweep file names its recipe
        from towerlab.sweep.load import load_sweep

        sweep = load_sweep(args.file, args.overrides)
        docs = render_sweep(rel, sweep.name, o)
    else:
        from towerlab.train.recipe import load_recipe

        # the recipe as it will run there: a batch that cannot divide over N x G workers fails here, not on the cluster
        recipe = load_recipe(args.file, [*args.overrides, *train_overrides(o)])
        _warn_node_local_paths(args.file, [*args.overrides, *train_overrides(o)])
        if args.cpus_per_node is None:  # the workers' CPUs plus two for Ray Data and the raylet
            o.cpus_per_node = recipe.train.cpus_per_worker * max(o.gpus_per_node, 1) + 2
        docs = render_train(rel, recipe.name, o)
    header = (f"Rendered by `towerlab k8s render {rel}` ({''.join(x + ' ' for x in args.overrides)}--nodes {o.nodes} "
              f"--gpus-per-node {o.gpus_per_node}); do not edit: render again.\n"
              f"Validate: towerlab k8s validate FILE. Apply: kubectl apply -n {o.namespace} -f FILE")
    text = to_yaml(docs, header)
    from towerlab.cluster.k8s.validate import validate_text

    problems = validate_text(text, "rendered")
    if problems:  # a bug of the renderer, not of the user
        raise RuntimeError("rendered manifest does not validate: " + "; ".join(problems))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
        err.print(f"wrote {out} ({', '.join(d['kind'] + ' ' + d['metadata']['name'] for d in docs)})", highlight=False)
    else:
        sys.stdout.write(text)
    return 0


def _check_k8s_flags(args: argparse.Namespace) -> None:
    """The flags that go verbatim into the manifest, checked as Kubernetes will check them (else the renderer's own
    validation would refuse its output as if it were a bug of the renderer)."""
    import re

    if args.cpus_per_node is not None and args.cpus_per_node < 1:
        raise ConfigError(f"--cpus-per-node {args.cpus_per_node}: give 1 or more")
    if args.ttl_seconds is not None and args.ttl_seconds < 0:
        raise ConfigError(f"--ttl-seconds {args.ttl_seconds}: give 0 or more seconds")
    quantity = r"[0-9]+(\.[0-9]+)?([EPTGM]i?|Ki|k)?"
    if args.memory_per_node is not None and not re.fullmatch(quantity, args.memory_per_node):
        raise ConfigError(f"--memory-per-node {args.memory_per_node}: give a Kubernetes quantity, e.g. 64Gi or 32G")
    if args.namespace is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", args.namespace):
        raise ConfigError(f"--namespace {args.namespace}: a namespace is lower-case letters, digits and '-' "
                          "(at most 63, starting and ending with a letter or digit)")
    if args.redis_address is not None and not re.fullmatch(r"[^\s:/]+:[0-9]{1,5}", args.redis_address):
        raise ConfigError(f"--redis-address {args.redis_address}: give HOST:PORT, e.g. redis.towerlab.svc:6379")


def cmd_k8s_validate(args: argparse.Namespace) -> int:
    from towerlab.cluster.k8s.validate import validate_file

    bad = 0
    for f in args.files:
        problems = validate_file(f)
        for p in problems:
            err.print(f"[red]error:[/] {p}", highlight=False, soft_wrap=True)
        if not problems:
            console.print(f"{f}: valid (KubeRay CRD schema, no unknown fields, pod rules)", highlight=False)
        bad += bool(problems)
    return 2 if bad else 0


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (else RAY_API_SERVER_ADDRESS)")
    p.add_argument("--token-file", help="file holding Ray's auth token (else RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH)")


def register(sub) -> None:
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

    k = sub.add_parser("k8s", help="KubeRay manifests: render from a recipe or sweep, validate")
    ksub = k.add_subparsers(dest="k8s_command", required=True)
    r = ksub.add_parser("render", help="RayJob (recipe) or RayCluster + RayJob (sweep) as YAML")
    r.add_argument("file", help="recipe or sweep YAML file, inside the project")
    r.add_argument("overrides", nargs="*", help="dotted overrides passed to the run")
    r.add_argument("--nodes", type=int, default=1, help="worker nodes (default 1)")
    r.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per worker node (default 0: CPU)")
    r.add_argument("--cpus-per-node", type=int, help="CPUs per worker node (default: the recipe's need)")
    r.add_argument("--memory-per-node", help="memory per worker node (default 60Gi per GPU, 32Gi for CPU nodes)")
    r.add_argument("--image", help="image built by cluster/Dockerfile (default towerlab:VERSION-rayRAY-py311[-gpu])")
    r.add_argument("--namespace", help="namespace (default towerlab)")
    r.add_argument("--tracking-uri", help="MLflow server inside the cluster")
    r.add_argument("--storage", help="checkpoints: pvc://CLAIM mounted at /mnt/shared (default "
                                     "pvc://towerlab-shared) or an object store URI s3://...")
    r.add_argument("--redis-address", help="Redis for GCS fault tolerance (HOST:PORT)")
    r.add_argument("--ttl-seconds", type=int, help="delete the cluster this long after the job (default 3600)")
    r.add_argument("--project-dir", default=".", help="project root (paths in the job are relative to it)")
    r.add_argument("-o", "--out", help="write to this file (default: stdout)")
    r.set_defaults(func=cmd_k8s_render)
    v = ksub.add_parser("validate", help="check manifests against the KubeRay CRDs, unknown fields, pod rules")
    v.add_argument("files", nargs="+", help="manifest YAML files")
    v.set_defaults(func=cmd_k8s_validate)
