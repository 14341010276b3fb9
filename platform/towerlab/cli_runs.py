"""CLI commands that act on recorded runs: `towerlab eval` (the recipe's evaluators on a saved checkpoint) and
`towerlab reproduce` (rerun a run from its MLflow record). Registered in cli.build_parser.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from towerlab.config import ConfigError

console = Console()
err = Console(stderr=True)


def _uri(flag: str | None) -> str:
    from towerlab.tracking import check_reachable, resolve_uri

    uri = resolve_uri(None, flag)
    check_reachable(uri)
    return uri


def evaluate_checkpoint(target: str, tracking_uri: str | None) -> tuple[dict[str, float], int, str]:
    """All evaluators of the checkpoint's recipe on its weights: (metrics, step, checkpoint path)."""
    import torch

    from towerlab.data.pipeline import preprocessor
    from towerlab.train.checkpoint import load_model, resolve_target
    from towerlab.train.evaluate import Evaluators
    from towerlab.train.launch import ensure_data

    uri = _uri(tracking_uri) if tracking_uri or not Path(target).is_dir() else None
    t = resolve_target(target, uri)
    model, step = load_model(t.checkpoint, t.recipe)
    manifest = ensure_data(t.recipe)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    evaluators = Evaluators(t.recipe, manifest, preprocessor(t.recipe, manifest, train=False))
    return evaluators(model, step, names=list(t.recipe.evals)), step, str(t.checkpoint)


def cmd_eval(args: argparse.Namespace) -> int:
    metrics, step, ckpt = evaluate_checkpoint(args.target, args.tracking_uri)
    table = Table("metric", "value", title=f"{ckpt} (step {step})")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    if args.json:
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"checkpoint": ckpt, "step": step, "metrics": metrics}, indent=1))
        os.replace(tmp, out)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from towerlab.train import reproduce

    uri = _uri(args.tracking_uri)
    plan = reproduce.plan(args.run_id, uri, args.name)
    for m in plan.mismatches:
        err.print(f"[yellow]warning:[/] {m}", highlight=False, soft_wrap=True)
    console.print(f"[bold]reproducing[/] run {plan.run_id} as [cyan]{plan.recipe.name}[/]")
    summary = reproduce.run(plan, uri)
    table = Table("metric", "recorded", "reproduced", "difference", title=f"run {plan.run_id} -> {summary.run_id}")
    for k in sorted(plan.recorded_metrics):
        if k.startswith(("train/loss", "eval/")) and k in summary.metrics:
            a, b = plan.recorded_metrics[k], float(summary.metrics[k])
            table.add_row(k, f"{a:.6f}", f"{b:.6f}", f"{b - a:+.2e}" if math.isfinite(a - b) else "-")
    console.print(table)
    return 0


def register(sub) -> None:
    """Add the `eval` and `reproduce` subcommands to cli.build_parser's subparsers."""
    e = sub.add_parser("eval", help="run a recipe's evaluators on a saved checkpoint")
    e.add_argument("target", help="MLflow run id, run directory (results/NAME) or checkpoint directory")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (needed for a run id)")
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("reproduce", help="rerun a run from its MLflow record (recipe, commit, data, versions)")
    r.add_argument("run_id", help="MLflow run id")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, ./mlruns.db)")
    r.add_argument("--name", help="name of the new run (default: NAME-repro-RUNID8)")
    r.set_defaults(func=cmd_reproduce)
