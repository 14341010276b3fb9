"""`towerlab train` (with its live progress and closing summary), `towerlab plan` (batch plan, negatives and memory
per worker, before anything starts) and `towerlab recipes ls|params|reference`."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from towerlab.cli import console, err
from towerlab.config import ConfigError


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
    from towerlab.tracking import stop as signals
    from towerlab.train.driver import root_cause, train
    from towerlab.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stop = threading.Event()
    poller: list[threading.Thread] = []
    started: list = []
    signals.install()  # SIGTERM and Ctrl-C end the MLflow run KILLED before the process exits

    def on_start(summary) -> None:
        started.append(summary)
        verb = "resuming" if summary.resumed else "starting"
        console.print(f"[bold]{verb}[/] run [cyan]{recipe.name}[/] (MLflow run {summary.run_id})")
        if args.progress:
            t = threading.Thread(target=_progress_poller, args=(summary, recipe.train.steps, stop), daemon=True)
            t.start()
            poller.append(t)

    try:
        summary = train(recipe, tracking_uri=args.tracking_uri, on_start=on_start)
    except KeyboardInterrupt:
        return stopped(f"training run '{recipe.name}'", started[0].run_id if started else None)
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
            logs = started[0].logs if started and started[0].logs else None
            err.print(f"[red]error:[/] training run '{recipe.name}' failed: {escape(root_cause(e))}"
                      + (f" (worker logs: {logs})" if logs else ""), highlight=False, soft_wrap=True)
            return 1
        raise
    finally:
        stop.set()
        for t in poller:
            t.join(timeout=5)
    print_summary(recipe, summary)
    return 0


def stopped(what: str, run_id: str | None) -> int:
    """The one line of a command ended by SIGTERM or Ctrl-C (its MLflow runs are KILLED by then), and the exit code
    of a process ended by that signal."""
    import signal

    from towerlab.tracking import stop as signals

    name = signal.Signals(signals.received() or signal.SIGINT).name
    # on a line of its own: Ray's workers stream progress bars to this stderr that end without a newline
    err.print()
    err.print(f"[red]error:[/] {what} stopped by {name}"
              + (f"; MLflow run {run_id} marked KILLED" if run_id else ""), highlight=False, soft_wrap=True)
    return signals.exit_code()


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
    for role, model_id in summary.models.items():
        t.add_row(f"{role} model", model_id)
    if summary.logs:
        t.add_row("worker logs", summary.logs)
    console.print(t)
    from towerlab.tracking import redact

    uri = redact(summary.tracking_uri)
    if uri.startswith(("http://", "https://")):
        console.print(f"Open the MLflow UI at {uri}")
    else:
        console.print(f"Open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then "
                      "http://127.0.0.1:5000 (experiment "
                      f"'{summary.experiment}', Model training > runs)")
    console.print(f"zero-shot top-1: {m.get('eval/zeroshot/top1', float('nan')):.1%}")


def render(recipe, plan, speed=None) -> None:
    """The plan as `towerlab plan` prints it: batch and negatives, model states per ZeRO stage, activations and
    loss, and the verdict for the rows the recipe uses (marked *); with `speed` (a flops.StepEstimate), the
    expected step time on the planned GPUs."""
    from towerlab.train.memory import gib, negatives

    b = plan.batch
    lines = [f"[bold]plan for '{recipe.name}'[/]",
             f"model: {recipe.model.arch}, {plan.params:,} parameters (largest layer {plan.largest_layer:,})",
             f"batch: global {b.global_batch:,} = micro-batch {b.micro_batch} x accumulation {b.accumulation} x "
             f"{b.world_size} workers; precision {plan.precision}"]
    for direction, n in negatives(recipe, b):
        lines.append(f"negatives ({recipe.loss.name}), {direction}: {n} per sample per step (plain accumulation "
                     f"would see {b.micro_batch * b.world_size - 1:,})")
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)

    st = Table(title="model states per worker by ZeRO stage", caption="offloaded: moved to host RAM or NVMe")
    for col in ("stage", "params", "grads", "optimizer", "own total", "DeepSpeed estimate", "offloaded"):
        st.add_column(col, justify="right")
    for s in plan.stages:
        mark = " *" if s.stage == plan.stage else ""
        st.add_row(f"{s.stage}{mark}", gib(s.params), gib(s.grads), gib(s.optimizer),
                   gib(s.params + s.grads + s.optimizer), gib(s.deepspeed) if s.deepspeed is not None else "-",
                   gib(s.offloaded))
    console.print(st)

    other = Table(title="activations (one micro-batch) and loss per worker")
    other.add_column("part")
    other.add_column("bytes", justify="right")
    for k, v in plan.activations.items():
        other.add_row(f"activations, {'with' if k == 'checkpointed' else 'without'} checkpointing"
                      + (" *" if (k == "checkpointed") == plan.checkpointing else ""), gib(v))
    for k, v in plan.loss.items():
        other.add_row(f"loss, {k} matrix" + (" *" if (k == "tiled") == plan.tiled else ""), gib(v))
    console.print(other)
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    limit = gib(plan.device_memory) if plan.device_memory is not None else "-"
    console.print(f"per worker (the * rows): {gib(plan.per_worker)} of {limit} ({plan.device_memory_source}): "
                  f"{verdict}", soft_wrap=True, highlight=False)
    for n in plan.notes:
        console.print(f"note: {n}", soft_wrap=True, highlight=False)
    if speed is not None:
        render_speed(recipe, speed)


def render_speed(recipe, speed) -> None:
    fast, slow = speed.seconds
    towers = ", ".join(f"{m} {f / 1e9:,.4g}" for m, f in speed.flops_per_sample.items())
    lo, hi = speed.mfu
    mfu = f"{lo:.0%}" if lo == hi else f"{lo:.0%}-{hi:.0%}"
    when = f"{fast:.3g} s" if fast == slow else f"{fast:.3g}-{slow:.3g} s"
    for line in (f"step FLOPs: {towers} GFLOP per sample (forward + backward); {speed.flops_per_worker / 1e12:,.2f} "
                 f"TFLOP per worker per step",
                 f"expected step time on {recipe.train.workers} x {speed.gpu} (bf16 peak {speed.peak_tflops:g} "
                 f"TFLOP/s) at MFU {mfu}: {when} per step, "
                 f"{recipe.data.global_batch / slow:,.0f}-{recipe.data.global_batch / fast:,.0f} samples/s",
                 f"MFU: {speed.mfu_source}"):
        console.print(line, soft_wrap=True, highlight=False)


def cmd_plan(args) -> int:
    from towerlab.train.memory import parse_bytes, plan_memory
    from towerlab.train.recipe import load_recipe

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.gpu_memory is not None:
        parse_bytes(args.gpu_memory, "--gpu-memory")
        overrides += [f"train.device_memory={args.gpu_memory}", "train.use_gpu=true"]
    recipe = load_recipe(args.recipe, overrides)
    plan = plan_memory(recipe, args.gpus_per_node)
    speed = None
    if recipe.train.use_gpu or args.gpu or args.peak_tflops:
        from towerlab.train.flops import estimate_step

        speed = estimate_step(recipe, args.gpu, args.peak_tflops, Path(args.measured) if args.measured else None)
    render(recipe, plan, speed)
    return 0 if plan.fits else 1


def recipe_dirs() -> list[Path]:
    return [Path.cwd() / "recipes", Path(__file__).resolve().parents[3] / "recipes"]


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

    from towerlab.train.module import build_module
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


def recipe_reference() -> str:
    """The recipe reference (docs/recipes.md) of towerlab's schema, its loss families, architectures and evaluators."""
    from towerlab.config import Recipe
    from towerlab.config.reference import render
    from towerlab.train.evaluate import EVALUATORS
    from towerlab.train.recipe import VARIANTS

    choices = {f"{v.section}.{v.key}": (v.registry.names() if v.registry is not None
                                         else list(v.names()) if v.names is not None else [])
               for v in VARIANTS}
    choices["evals.<NAME>.type"] = EVALUATORS.names()
    return render(Recipe, VARIANTS, choices)


def cmd_recipes_tiny_clip(args: argparse.Namespace) -> int:
    from towerlab.data.digits import CAPTIONS, NAMES, PROMPTS
    from towerlab.data.tokenizer import words
    from towerlab.models.tiny_clip import make_tiny_clip

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file is there; give a new directory for the tiny CLIP model")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty; give a new directory for the tiny CLIP model")
    texts = [t.format(name=n, digit=d) for t in CAPTIONS + PROMPTS for d, n in enumerate(NAMES)]
    make_tiny_clip(out, sorted({w for t in texts for w in words(t)}))
    console.print(f"wrote a tiny random CLIPModel (digits vocabulary) to {out}", highlight=False)
    return 0


def cmd_recipes_reference(args: argparse.Namespace) -> int:
    text = recipe_reference()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    from towerlab.util import atomic_write

    try:
        atomic_write(args.write, text)  # a failed run leaves the old file, never half of a new one
    except OSError as e:
        raise ConfigError(f"--write {args.write}: cannot write it ({e.strerror or e}): give a file in an existing "
                          "directory") from None
    console.print(f"wrote {args.write}", highlight=False)
    return 0


def register(sub) -> None:
    """`train`, `plan` and `recipes` under the top-level parser's subcommands."""
    t = sub.add_parser("train", help="train a recipe (Ray Train + DeepSpeed, tracked in MLflow)")
    t.add_argument("recipe", help="recipe YAML file, e.g. recipes/digits_clip.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 loss.name=siglip")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (else recipe, MLFLOW_TRACKING_URI, ./mlruns.db)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress bar")
    t.add_argument("-v", "--verbose", action="store_true", help="stream Ray's worker logs and Ray Data's progress "
                   "(default: in <run dir>/logs)")
    t.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="batch plan, negatives and per-worker memory by ZeRO stage (exit 1: "
                                    "it cannot fit)")
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/pretrain_g14_large_batch.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.micro_batch=64")
    p.add_argument("--workers", type=int, help="plan for N workers (train.workers)")
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB (sets train.use_gpu and device_memory)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for DeepSpeed's estimators")
    p.add_argument("--gpu", help="the GPU to expect the step time on, e.g. H100, A100 (default: this machine's, "
                                 "else H100); shown for GPU recipes or when given")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak in TFLOP/s (default: from --gpu)")
    p.add_argument("--measured", help="the device check's results (default: benchmarks/results/device_check.json)")
    p.set_defaults(func=cmd_plan)

    r = sub.add_parser("recipes", help="list recipes; a recipe's parameters").add_subparsers(
        dest="recipes_command", required=True)
    r.add_parser("ls", help="list the recipes in ./recipes").set_defaults(func=cmd_recipes_ls)
    rp = r.add_parser("params", help="a recipe's parameter names, shapes and which train (for model.freeze)")
    rp.add_argument("recipe", help="recipe YAML file")
    rp.add_argument("overrides", nargs="*", help="dotted overrides")
    rp.set_defaults(func=cmd_recipes_params)
    rt = r.add_parser("tiny-clip", help="write a tiny random CLIPModel folder (digits vocabulary) for offline "
                                        "smoke runs of model.pretrained recipes")
    rt.add_argument("out", help="a new directory, e.g. models/tiny-clip")
    rt.set_defaults(func=cmd_recipes_tiny_clip)
    rr = r.add_parser("reference", help="every recipe key with its type, default and meaning (docs/recipes.md)")
    rr.add_argument("--write", metavar="PATH", help="write it to PATH (default: print it)")
    rr.set_defaults(func=cmd_recipes_reference)
