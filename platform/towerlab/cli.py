"""The `towerlab` command: train | data prepare | recipes ls.

User errors (ConfigError: a recipe typo, a wrong type, a missing file, an unreachable server) print one line and
exit 2; a failed training run prints its cause and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from towerlab.config import ConfigError

console = Console(stderr=False)
err = Console(stderr=True)


def _progress_poller(summary, total: int, stop: threading.Event) -> None:
    """Show step/loss/zero-shot from the run's MLflow metrics while the workers train (rank 0 logs them)."""
    from mlflow import MlflowClient
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    client = MlflowClient(summary.tracking_uri)
    with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False) as bar:
        task = bar.add_task("train", total=total, info="starting Ray workers...")
        while not stop.wait(2.0):
            try:
                run = client.get_run(summary.run_id)
            except Exception:  # the store may be busy; try again at the next tick
                continue
            m = run.data.metrics
            if "train/loss" in m:
                step = max((x.step for x in client.get_metric_history(summary.run_id, "train/loss")), default=0)
                info = f"loss {m['train/loss']:.3f}  scale {m.get('train/logit_scale', 0):.1f}"
                if "eval/zeroshot_top1" in m:
                    info += f"  zero-shot top-1 {m['eval/zeroshot_top1']:.1%}"
                bar.update(task, completed=step, info=info)


def cmd_train(args: argparse.Namespace) -> int:
    from towerlab.train.launch import root_cause, train
    from towerlab.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stop = threading.Event()
    poller: list[threading.Thread] = []

    def on_start(summary) -> None:
        verb = "resuming" if summary.resumed else "starting"
        console.print(f"[bold]{verb}[/] run [cyan]{recipe.name}[/] (MLflow run {summary.run_id})")
        if args.progress:
            t = threading.Thread(target=_progress_poller, args=(summary, recipe.train.steps, stop), daemon=True)
            t.start()
            poller.append(t)

    try:
        summary = train(recipe, tracking_uri=args.tracking_uri, on_start=on_start)
    except Exception as e:
        stop.set()
        if isinstance(e, ConfigError):
            raise
        from ray.exceptions import RayError

        try:
            from ray.train import TrainingFailedError
        except ImportError:  # pragma: no cover
            TrainingFailedError = RayError  # type: ignore[misc,assignment]
        if isinstance(e, (TrainingFailedError, RayError)):
            err.print(f"[red]error:[/] training run '{recipe.name}' failed: {root_cause(e)}", highlight=False,
                      soft_wrap=True)
            return 1
        raise
    finally:
        stop.set()
        for t in poller:
            t.join(timeout=5)
    print_summary(recipe, summary)
    return 0


def print_summary(recipe, summary) -> None:
    m = summary.metrics
    t = Table(title=f"towerlab run '{recipe.name}'", show_header=False)
    t.add_row("MLflow run", summary.run_id)
    t.add_row("status", summary.status)
    t.add_row("steps", str(m.get("step", "-")))
    for key in ("train/loss", "train/logit_scale", "train/samples_per_s", "eval/zeroshot_top1", "eval/zeroshot_top5",
                "eval/recall_at_1_i2t", "eval/recall_at_1_t2i"):
        if key in m:
            t.add_row(key, f"{m[key]:.4f}")
    console.print(t)
    uri = summary.tracking_uri
    if uri.startswith(("http://", "https://")):
        console.print(f"Open the MLflow UI at {uri}")
    else:
        console.print(f"Open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then "
                      "http://127.0.0.1:5000 (experiment "
                      f"'{summary.experiment}', Model training > runs)")
    console.print(f"zero-shot top-1: {m.get('eval/zeroshot_top1', float('nan')):.1%}")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from towerlab.data import SOURCES, prepare

    if args.source not in SOURCES:
        raise ConfigError(SOURCES.unknown_message(args.source))
    m = prepare(args.source, args.out, shards=args.shards, seed=args.seed, size=args.size)
    counts = ", ".join(f"{k}: {v}" for k, v in m.data["counts"].items())
    console.print(f"wrote {args.source} to {m.root} ({counts}; {len(m.files('train'))} train shards; "
                  f"fingerprint {m.fingerprint[:12]})")
    return 0


def recipe_dirs() -> list[Path]:
    return [Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"]


def cmd_recipes_ls(args: argparse.Namespace) -> int:
    seen: set[str] = set()
    t = Table("recipe", "purpose")
    for d in recipe_dirs():
        for p in sorted(d.glob("*.yaml")):
            if p.name in seen:
                continue
            seen.add(p.name)
            first = next((line[1:].strip() for line in p.read_text().splitlines() if line.startswith("#")), "")
            t.add_row(str(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p), first)
    console.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="towerlab", description="Contrastive multimodal pretraining on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe (Ray Train + DeepSpeed, tracked in MLflow)")
    t.add_argument("recipe", help="recipe YAML file, e.g. recipes/digits_clip.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 loss.name=siglip")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (else recipe, MLFLOW_TRACKING_URI, ./mlruns.db)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress bar")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    dp = d.add_parser("prepare", help="write a built-in source as Parquet shards with a manifest")
    dp.add_argument("source", help="digits | synthetic")
    dp.add_argument("--out", required=True, help="output directory")
    dp.add_argument("--shards", type=int, default=4)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--size", type=int, default=None, help="rows (synthetic only)")
    dp.set_defaults(func=cmd_data_prepare)

    r = sub.add_parser("recipes", help="list recipes").add_subparsers(dest="recipes_command", required=True)
    r.add_parser("ls", help="list the recipes in ./recipes").set_defaults(func=cmd_recipes_ls)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
