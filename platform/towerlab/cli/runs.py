"""CLI commands that act on recorded runs: `towerlab eval` (the recipe's evaluators on a saved checkpoint),
`towerlab export` (a checkpoint as a transformers CLIPModel or OpenCLIP directory), `towerlab reproduce` (rerun a
run from its MLflow record), `towerlab ui` (the MLflow UI on the runs table) and `towerlab runs doctor` (RUNNING
runs whose driver died, closed FAILED with --fix).

Each checks the tracking store first (a short plain request; see tracking/uri.py) and bounds MLflow's retries, so
a store that is down or silent is one `error:` line within seconds, not minutes of retries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from rich.table import Table

from towerlab.cli import console, err
from towerlab.config import ConfigError
from towerlab.util import atomic_write, port_free, wait_until


def _uri(flag: str | None, sought: str = "no runs") -> str:
    from towerlab.tracking import check_reachable, resolve_uri
    from towerlab.tracking.uri import require_store

    uri = resolve_uri(None, flag)
    check_reachable(uri)
    require_store(uri, sought)  # these commands read runs: an absent local store is a wrong --tracking-uri
    return uri


def _run_id(target: str) -> bool:
    """Whether `target` names an MLflow run (32 hex digits, not a directory): only then is the store needed; any
    other target that is not a directory is a wrong path, reported as such by resolve_target."""
    import re

    return not Path(target).is_dir() and re.fullmatch(r"[0-9a-f]{32}", target) is not None


def evaluate_checkpoint(target: str, tracking_uri: str | None, recipe_path: str | None = None,
                        overrides: list[str] | tuple = (),
                        results: str | None = None) -> tuple[dict[str, float], int, str]:
    """All evaluators of the checkpoint's recipe on its weights: (metrics, step, checkpoint path). A model rather
    than a run (hf:NAME, open_clip:ARCH:FILE, or a directory `towerlab export` or save_pretrained wrote) is
    evaluated untrained, with the data and evaluators of `recipe_path` (default: towerlab's defaults) and
    `overrides`. A checkpoint takes evaluator overrides only (evals..., eval.*): its weights fit its recipe.
    `results`: a directory for one CLIP_benchmark result JSON per zeroshot/retrieval evaluator (NAME.json)."""
    import torch

    from towerlab.data.pipeline import preprocessor
    from towerlab.models.imported import spec_of
    from towerlab.tracking.uri import store_errors
    from towerlab.train.checkpoint import load_model, resolve_target
    from towerlab.train.dataset import ensure_data
    from towerlab.train.evaluate import Evaluators

    spec = spec_of(target)
    if spec is not None:
        from towerlab.models import ContrastiveModel
        from towerlab.train.recipe import load_recipe

        recipe = load_recipe(recipe_path, [*overrides, f"model.pretrained={spec}"])
        lc = recipe.loss
        model = ContrastiveModel(recipe.model, temperature_init=lc.temperature_init, bias_init=lc.bias_init).eval()
        step, where = 0, spec
    else:
        if recipe_path or not all(evaluator_override(o) for o in overrides):
            raise ConfigError("--recipe and overrides apply to a model directory (hf:, open_clip:, an export); a "
                              "checkpoint is evaluated with the recipe it was trained with (evaluator overrides, "
                              "evals... and eval.*, apply to both)")
        uri = _uri(tracking_uri, f"no MLflow run '{target}'") if tracking_uri or _run_id(target) else None
        with store_errors(uri or ""):
            t = resolve_target(target, uri)
        recipe = with_overrides(t.recipe, overrides) if overrides else t.recipe
        model, step = load_model(t.checkpoint, recipe)
        where = str(t.checkpoint)
    manifest = ensure_data(recipe)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    # evaluated at once: an undecodable image is reported by the evaluation itself, not decoded twice beforehand
    evaluators = Evaluators(recipe, manifest, preprocessor(recipe, manifest, train=False), check_images=False)
    metrics = evaluators(model, step, names=list(recipe.evals))
    if results:
        from towerlab.eval.benchmarks import write_results

        write_results(results, recipe, metrics, model=spec or recipe.model.arch, pretrained=where)
    return metrics, step, where


def evaluator_override(override: str) -> bool:
    key = override.split("=", 1)[0].strip()
    return key == "evals" or key.startswith(("evals.", "eval."))


def with_overrides(recipe, overrides):
    """A recorded recipe with `overrides` applied, through the same loader (and checks) as a recipe file."""
    import tempfile

    from towerlab.config.load import to_yaml
    from towerlab.train.recipe import load_recipe

    with tempfile.TemporaryDirectory(prefix="towerlab-eval-") as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(to_yaml(recipe))
        return load_recipe(path, list(overrides))


def cmd_eval(args: argparse.Namespace) -> int:
    metrics, step, ckpt = evaluate_checkpoint(args.target, args.tracking_uri, args.recipe, args.overrides,
                                              results=args.results)
    table = Table("metric", "value", title=f"{ckpt} (step {step})")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    if args.json:
        atomic_write(args.json, json.dumps({"checkpoint": ckpt, "step": step, "metrics": metrics}, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from towerlab.train.export import export

    uri = (_uri(args.tracking_uri, f"no MLflow run '{args.target}'") if args.tracking_uri or _run_id(args.target)
           else None)
    out = export(args.target, args.format, args.out, uri, warn=lambda msg: err.print(msg, highlight=False,
                                                                                      markup=False))
    console.print(f"exported {args.format} to {out}", highlight=False)
    if args.register:
        from towerlab.tracking.logged_models import log_model, metrics_at
        from towerlab.train.export import EXPORT_FILE

        marker = json.loads((out / EXPORT_FILE).read_text())
        run_id, step = marker.get("mlflow_run_id"), int(marker.get("step", 0))
        uri = _uri(args.tracking_uri)
        metrics = metrics_at(uri, run_id, step) if run_id else {}
        model_id = log_model(uri, run_id, out, name=f"{args.register}-step{step}", step=step, metrics=metrics,
                             params={"format": args.format}, register=args.register)
        console.print(f"logged model {model_id} and registered it as {args.register}", highlight=False)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from towerlab.cli.train import stopped
    from towerlab.tracking import stop as signals
    from towerlab.tracking.uri import store_errors
    from towerlab.train import reproduce

    uri = _uri(args.tracking_uri, f"no MLflow run '{args.run_id}'")
    with store_errors(uri):
        plan = reproduce.plan(args.run_id, uri, args.name)
    for m in plan.mismatches:
        err.print(f"[yellow]warning:[/] {m}", highlight=False, soft_wrap=True)
    console.print(f"[bold]reproducing[/] run {plan.run_id} as [cyan]{plan.recipe.name}[/]")
    signals.install()  # SIGTERM and Ctrl-C end the new run KILLED before the process exits
    started: list = []
    try:
        summary = reproduce.run(plan, uri, on_start=started.append)
    except KeyboardInterrupt:
        return stopped(f"reproduction '{plan.recipe.name}'", started[0].run_id if started else None)
    table = Table("metric", "recorded", "reproduced", "difference", title=f"run {plan.run_id} -> {summary.run_id}")
    for k in sorted(plan.recorded_metrics):
        if k.startswith(("train/loss", "eval/")) and k in summary.metrics:
            a, b = plan.recorded_metrics[k], float(summary.metrics[k])
            table.add_row(k, f"{a:.6f}", f"{b:.6f}", f"{b - a:+.2e}" if math.isfinite(a - b) else "-")
    console.print(table)
    return 0


def ui_link(base: str, experiment_id: str) -> str:
    """MLflow 3 opens an experiment in its GenAI view; the runs table (a sweep's children under its parent) is the
    "Model training" view, reachable directly with workflowType=machine_learning."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def cmd_ui(args: argparse.Namespace) -> int:
    from towerlab.tracking import check_reachable, redact, resolve_uri
    from towerlab.tracking.uri import store_errors

    uri = resolve_uri(None, args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)  # before importing MLflow: a silent server is an answer within seconds
    import requests
    from mlflow import MlflowClient

    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        with store_errors(uri):
            exp = _experiment(MlflowClient(uri), args.experiment, uri)
        console.print(ui_link(uri, exp.experiment_id), soft_wrap=True)
        return 0
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"no local MLflow store {uri}: train something first, or pass --tracking-uri")
    with store_errors(uri):
        exp = _experiment(MlflowClient(uri), args.experiment, uri)
    if not port_free(args.port):
        raise ConfigError(f"port {args.port} on 127.0.0.1 is in use: pass --port with a free one")
    mlflow = Path(sys.executable).parent / "mlflow"
    # its own process group: mlflow ui runs uvicorn (and its workers), all stopped together below; without the
    # job runner MLflow 3 starts for its GenAI jobs (eight processes a runs table does not need)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen([str(mlflow if mlflow.exists() else "mlflow"), "ui", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(args.port)], start_new_session=True, env=env)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the UI as Ctrl-C does
    base = f"http://127.0.0.1:{args.port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise ConfigError(f"mlflow ui exited with code {proc.returncode} for {redact(uri)}: see its output "
                                  "above")
            try:
                return requests.get(f"{base}/health", timeout=2).ok
            except requests.RequestException:
                return False

        if not wait_until(up, timeout=120):
            raise ConfigError(f"mlflow ui did not answer on {base} within 120 s")
        console.print(f"MLflow UI for experiment '{exp.name}' (runs table; Ctrl-C stops it):", highlight=False)
        console.print(ui_link(base, exp.experiment_id), soft_wrap=True, highlight=False)
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop_group(proc)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """RUNNING runs whose heartbeat is stale (their driver died: SIGKILL, an OOM kill, a lost node); --fix closes
    them FAILED with the reason."""
    from mlflow import MlflowClient

    from towerlab.tracking import heartbeat
    from towerlab.tracking.uri import store_errors

    if args.stale_after <= 0:
        raise ConfigError(f"--stale-after {args.stale_after:g}: give a number of seconds above 0")
    uri = _uri(args.tracking_uri, "no runs to check")
    client = MlflowClient(uri)
    with store_errors(uri):
        dead = heartbeat.dead_runs(client, args.stale_after)
        if not dead:
            console.print(f"no RUNNING run without a heartbeat for {args.stale_after:g} s", highlight=False)
            return 0
        t = Table(title=f"RUNNING runs whose driver died (no heartbeat for {args.stale_after:g} s)")
        t.add_column("run", no_wrap=True, min_width=32)  # whole: it is what `mlflow runs` commands take
        for col in ("name", "experiment", "last heartbeat", "action"):
            t.add_column(col)
        for d in dead:
            action = "closed FAILED" if args.fix else "-"
            if args.fix:
                heartbeat.close_dead(client, d.run_id, d.last_beat)
            t.add_row(d.run_id, d.name or "", d.experiment, heartbeat.when(d.last_beat), action)
    console.print(t)
    if args.fix:
        console.print(f"closed {len(dead)} run{'s' if len(dead) > 1 else ''} FAILED", highlight=False)
    else:
        console.print("close them FAILED with `towerlab runs doctor --fix`", highlight=False)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ConfigError(f"no experiment '{name}' in {uri} (experiments: {names}): pass --experiment")
    return exp


def register(sub) -> None:
    """`eval`, `export`, `reproduce`, `runs doctor` and `ui` under the top-level parser's subcommands."""
    e = sub.add_parser("eval", help="run a recipe's evaluators on a saved checkpoint, or on a model directory")
    e.add_argument("target", help="MLflow run id, run directory (results/NAME) or checkpoint directory; or a model: "
                                  "hf:NAME, open_clip:ARCH:FILE, a `towerlab export` or save_pretrained directory")
    e.add_argument("overrides", nargs="*", help="for a model: dotted recipe overrides, e.g. data.source=digits; for "
                                                "a checkpoint too: evaluators, e.g. 'evals={inet: {data: DIR}}'")
    e.add_argument("--recipe", help="for a model: the recipe whose data and evaluators to use (default: defaults)")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (needed for a run id)")
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--results", metavar="DIR", help="also write each zeroshot/retrieval evaluator's metrics as a "
                                                    "CLIP_benchmark result JSON, DIR/NAME.json (also linear_probe)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a checkpoint as a transformers CLIPModel (hf) or OpenCLIP directory")
    x.add_argument("target", help="MLflow run id, run directory (results/NAME) or checkpoint directory")
    x.add_argument("--format", required=True, choices=("hf", "open_clip"),
                   help="hf: CLIPModel.from_pretrained loads it; open_clip: open_clip.create_model('local-dir:DIR')")
    x.add_argument("--out", required=True, help="a new or empty directory (or one an earlier export wrote)")
    x.add_argument("--tracking-uri", help="MLflow tracking URI (needed for a run id and --register)")
    x.add_argument("--register", metavar="NAME", help="also log the export as an MLflow LoggedModel of its run "
                                                      "(with the run's eval metrics at its step) and register it")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("reproduce", help="rerun a run from its MLflow record (recipe, commit, data, versions)")
    r.add_argument("run_id", help="MLflow run id")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, ./mlruns.db)")
    r.add_argument("--name", help="name of the new run (default: NAME-repro-RUNID8)")
    r.set_defaults(func=cmd_reproduce)

    from towerlab.tracking.heartbeat import STALE_AFTER_S

    d = sub.add_parser("runs", help="the tracking store's runs").add_subparsers(dest="runs_command", required=True)
    doc = d.add_parser("doctor", help="list RUNNING runs whose driver died (stale heartbeat); --fix closes them FAILED")
    doc.add_argument("--tracking-uri", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, ./mlruns.db)")
    doc.add_argument("--fix", action="store_true", help="end them FAILED, reason: driver died: no heartbeat since ...")
    doc.add_argument("--stale-after", type=float, default=STALE_AFTER_S, metavar="SECONDS",
                     help=f"a heartbeat older than this is stale (default: {STALE_AFTER_S:g})")
    doc.set_defaults(func=cmd_doctor)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 and print the runs-table link")
    u.add_argument("--tracking-uri", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, ./mlruns.db)")
    u.add_argument("--experiment", default="towerlab", help="experiment to open (default: towerlab)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)
