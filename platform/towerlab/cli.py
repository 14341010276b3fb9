"""The `towerlab` command: train | sweep | compare | data prepare | recipes ls (and, from cluster_cli.py, submit |
jobs | k8s).

User errors (ConfigError: a recipe typo, a wrong type, a missing file, an unreachable server) print one line and
exit 2; a failed training run prints its cause and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.markup import escape
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
                if "eval/zeroshot/top1" in m:
                    info += f"  zero-shot top-1 {m['eval/zeroshot/top1']:.1%}"
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
            err.print(f"[red]error:[/] training run '{recipe.name}' failed: {escape(root_cause(e))}", highlight=False,
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
    for key in ("train/loss", "train/logit_scale", "train/samples_per_s", "eval/zeroshot/top1", "eval/zeroshot/top5",
                "eval/retrieval/recall_at_1_i2t", "eval/retrieval/recall_at_1_t2i"):
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
    console.print(f"zero-shot top-1: {m.get('eval/zeroshot/top1', float('nan')):.1%}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from towerlab.sweep.load import load_sweep
    from towerlab.sweep.run import STATE_FILE, run_sweep

    if args.resume:
        import json

        from towerlab.config import load_structured
        from towerlab.sweep.schema import SweepConfig

        state = Path(args.storage_path) / args.resume / STATE_FILE
        if not state.is_file():
            raise ConfigError(f"no sweep '{args.resume}' to resume: {state} does not exist (see --storage-path)")
        saved = json.loads(state.read_text())
        sweep_file = saved["sweep_file"]
        sweep = load_structured(SweepConfig, None, [], base=saved["sweep"])
        summary = run_sweep(sweep, sweep_file, tracking_uri=args.tracking_uri, resume=True)
    else:
        if not args.sweep:
            raise ConfigError("give a sweep file (e.g. sweeps/quickstart.yaml) or --resume NAME")
        sweep = load_sweep(args.sweep, args.overrides)
        console.print(f"[bold]sweep[/] [cyan]{sweep.name}[/]: {len(sweep.space)} searched keys, "
                      f"scheduler {sweep.scheduler.name}, metric {sweep.metric} ({sweep.mode})")
        summary = run_sweep(sweep, args.sweep, tracking_uri=args.tracking_uri)
    console.print(f"sweep '{summary.name}': {summary.trials} trials, {summary.errors} failed; MLflow parent run "
                  f"{summary.parent_run_id}")
    if summary.best_metric is not None:
        console.print(f"best {summary.best_metric:.4f} with {summary.best_config}")
    console.print(f"compare: towerlab compare --sweep {summary.name} --tracking-uri {summary.tracking_uri}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from towerlab.tracking import resolve_uri
    from towerlab.tracking.compare import compare_runs, compare_sweep, log_to_parent, plot

    uri = resolve_uri(None, args.tracking_uri)
    if args.sweep:
        c = compare_sweep(uri, args.sweep, args.metric, args.mode)
    elif args.runs:
        c = compare_runs(uri, args.runs, args.metric or "eval/zeroshot/top1", args.mode or "max")
    else:
        raise ConfigError("give --sweep NAME or one or more MLflow run ids")
    t = Table("#", "run", "status", *c.keys, c.metric, "train/loss")
    for i, r in enumerate(c.rows, 1):
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        t.add_row(str(i), r["name"], r["status"], *(str(r["params"][k]) for k in c.keys), fmt(r["metric"]),
                  fmt(r["loss"]))
    console.print(t)
    out = Path(args.out or f"results/compare-{args.sweep or 'runs'}.png").absolute()
    png = plot(c, out)
    log_to_parent(uri, c, png)
    if png:
        console.print(f"plot: {png}" + (" (also an artifact of the sweep's parent run)" if c.parent_run_id else ""))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from towerlab.data import SOURCES, prepare

    if args.source == "images":
        from towerlab.data.folder import cmd_prepare_images

        if not args.images or not args.captions:
            raise ConfigError("`towerlab data prepare images` needs --images DIR and --captions FILE.csv|.jsonl")
        return cmd_prepare_images(args)
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


def cmd_recipes_params(args: argparse.Namespace) -> int:
    """The model's parameter names (what model.freeze patterns match), shapes and whether they train."""
    import torch

    from towerlab.train.loop import build_module
    from towerlab.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    with torch.device("meta"):
        model = build_module(recipe, rank=0, world_size=1, load_weights=False).model
    t = Table("parameter", "shape", "trains")
    trainable = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        t.add_row(name, "x".join(map(str, p.shape)), "yes" if p.requires_grad else "[red]frozen[/red]")
    console.print(t)
    console.print(f"{trainable:,} of {total:,} parameters train")
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

    s = sub.add_parser("sweep", help="run a Ray Tune sweep of a recipe (one MLflow child run per trial)")
    s.add_argument("sweep", nargs="?", help="sweep YAML file, e.g. sweeps/quickstart.yaml")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file, e.g. search.num_samples=2")
    s.add_argument("--resume", metavar="NAME", help="continue sweep NAME (after the driver was stopped or killed)")
    s.add_argument("--storage-path", default="results", help="where sweeps keep their state (default: results)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (else the sweep file, MLFLOW_TRACKING_URI, ./mlruns.db)")
    s.set_defaults(func=cmd_sweep)

    c = sub.add_parser("compare", help="table and plot of a sweep's trials, or of any runs")
    c.add_argument("runs", nargs="*", help="MLflow run ids")
    c.add_argument("--sweep", help="sweep name")
    c.add_argument("--metric", help="metric to rank by (default: the sweep's metric)")
    c.add_argument("--mode", choices=["max", "min"])
    c.add_argument("--out", help="PNG path (default: results/compare-<sweep>.png)")
    c.add_argument("--tracking-uri", help="MLflow tracking URI")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    dp = d.add_parser("prepare", help="write a built-in source as Parquet shards with a manifest")
    dp.add_argument("source", help="digits | synthetic | images (your own folder: --images, --captions)")
    dp.add_argument("--out", required=True, help="output directory")
    dp.add_argument("--shards", type=int, default=4)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--size", type=int, default=None, help="rows (synthetic only)")
    dp.add_argument("--images", help="images: the image folder (paths in the captions file are relative to it)")
    dp.add_argument("--captions", help="images: a .csv (image, caption[, caption_2..., label]) or .jsonl file")
    dp.add_argument("--format", choices=["parquet", "webdataset"], default="parquet", help="images: shard format")
    dp.add_argument("--shard-size", type=int, default=1000, help="images: records per shard")
    dp.add_argument("--strict", action="store_true", help="images: fail on the first bad records instead of "
                    "skipping and counting them")
    dp.add_argument("--heldout", type=float, default=0.1, help="images: held-out fraction for evaluation")
    dp.add_argument("--prompt", default="a photo of a {}.", help="images: zero-shot prompt per label")
    dp.set_defaults(func=cmd_data_prepare)

    from towerlab.train.plan import add_parser as add_plan_parser

    add_plan_parser(sub)

    r = sub.add_parser("recipes", help="list recipes; a recipe's parameters").add_subparsers(
        dest="recipes_command", required=True)
    r.add_parser("ls", help="list the recipes in ./recipes").set_defaults(func=cmd_recipes_ls)
    rp = r.add_parser("params", help="a recipe's parameter names, shapes and which train (for model.freeze)")
    rp.add_argument("recipe", help="recipe YAML file")
    rp.add_argument("overrides", nargs="*", help="dotted overrides")
    rp.set_defaults(func=cmd_recipes_params)

    from towerlab import cli_runs

    cli_runs.register(sub)

    from towerlab.cluster_cli import add_parsers as add_cluster_parsers

    add_cluster_parsers(sub)  # submit, jobs, k8s
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # e may hold ray[default]
        return 2


if __name__ == "__main__":
    sys.exit(main())
