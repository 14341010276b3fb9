"""Throughput features on CPU: samples/s of the digits ViT's training step with patch dropout (FLIP, keep 0.5)
against none, and with the towers compiled (torch.compile) against eager, all measured in the same run.

The step is the model's own (no data pipeline, no DeepSpeed): random digits-shaped images and token ids, both
towers, symmetric InfoNCE over the batch, backward, AdamW step. Two scopes: the whole two-tower step, and the image
tower alone (patch dropout shortens only the image sequence, so the whole step's gain is diluted by the text tower
and the loss). Configurations are interleaved (round-robin over repeats) so a change in the machine's load hits all
of them alike; each figure is the median over repeats, and the ratio is against the eager, no-dropout baseline of
the same scope. Compilation happens in a warm-up before timing and its duration is reported separately.

    PYTHONPATH=platform .venv/bin/python benchmarks/throughput.py --compare patch_dropout [--batch 128] [--steps 3]
    PYTHONPATH=platform .venv/bin/python benchmarks/throughput.py --compare compile --scopes image

Besides the ratio of the medians, the median of the per-repeat ratios (each repeat runs every configuration back
to back, so that ratio sees one load) is reported. Each comparison (patch_dropout: baseline vs keep 0.5; compile: baseline vs compiled; all: the four) carries its own
baseline from the same run and is stored under its name in benchmarks/results/throughput.json, with the load
average before and after (other processes on the machine change every figure; the ratios are what to read).
Goal: patch dropout 0.5 >= 1.6x samples/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from _results import write_result

import torch

from towerlab.train.module import build_module
from towerlab.train.optim import build_optimizer
from towerlab.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = {"patch_dropout": ["baseline", "patch_dropout_0.5"], "compile": ["baseline", "compile"],
               "all": ["baseline", "patch_dropout_0.5", "compile", "compile+patch_dropout_0.5"]}
CONFIGS = {"baseline": (0.0, False), "patch_dropout_0.5": (0.5, False), "compile": (0.0, True),
           "compile+patch_dropout_0.5": (0.5, True)}


def make_step(name: str, scope: str, batch: int, threads: int):
    drop, compiled = CONFIGS[name]
    recipe = load_recipe(ROOT / "recipes" / "digits_clip.yaml",
                         ["train.workers=1", f"model.vision.patch_dropout={drop}", f"train.compile={str(compiled).lower()}"])
    torch.manual_seed(0)
    module = build_module(recipe, 0, 1)
    module.train()
    opt, _ = build_optimizer(module, recipe.optim, 100)
    v, t = recipe.model.vision, recipe.model.text
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    tokens = torch.randint(3, t.vocab_size, (batch, t.context_length), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if scope == "image":
            loss = module.model.encode("image", images).square().sum()
        else:
            loss = module({"image": images, "text": tokens})["loss"]
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="all")
    ap.add_argument("--budget", type=float, default=170.0,
                    help="seconds; past it the run stops and records how far it got (compilation under load)")
    ap.add_argument("--scopes", nargs="+", choices=["step", "image"], default=["step", "image"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    names = COMPARISONS[args.compare]
    result: dict = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                    "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_before": load_before, "scopes": {}}
    # a watchdog thread, not SIGALRM: compilation blocks the main thread in native code, where a signal handler
    # never runs; the thread records how far the run got, writes the result and ends the process
    import threading

    def out_of_time() -> None:
        result["unfinished"] = (f"stopped at the {args.budget:.0f} s budget during {result.get('at', '?')}: "
                                "not measured on this machine at this load")
        print(result["unfinished"], flush=True)
        finish(args, result)
        os._exit(3)

    watchdog = threading.Timer(args.budget, out_of_time)
    watchdog.daemon = True
    watchdog.start()
    run_scopes(args, names, result)
    watchdog.cancel()
    finish(args, result)


def run_scopes(args, names: list[str], result: dict) -> None:
    for scope in args.scopes:
        steps, warm = {}, {}
        for name in names:
            result["at"] = f"the {scope} warm-up of {name}"
            steps[name] = make_step(name, scope, args.batch, args.threads)
            t0 = time.perf_counter()
            for _ in range(2):  # warm-up: allocator, and for compiled towers the compilation (train graph)
                steps[name]()
            warm[name] = time.perf_counter() - t0
            print(f"[{scope}] {name}: warm-up {warm[name]:.1f} s", flush=True)
        result["at"] = f"the {scope} timed repeats"
        rates: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for name in names:  # interleaved
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))
        med = {n: statistics.median(r) for n, r in rates.items()}
        result["scopes"][scope] = {
            "samples_per_s_median": med, "samples_per_s_all": rates, "warmup_s": warm,
            "ratio_vs_baseline": {n: med[n] / med["baseline"] for n in names},
            # each repeat's configurations ran back to back: their ratio sees the same load
            "paired_ratio_median": {n: statistics.median(a / b for a, b in zip(rates[n], rates["baseline"]))
                                    for n in names}}
        paired = result["scopes"][scope]["paired_ratio_median"]
        print(f"[{scope}] " + "; ".join(f"{n}: {med[n]:,.0f} samples/s ({med[n] / med['baseline']:.2f}x of medians, "
                                        f"{paired[n]:.2f}x paired, warm-up {warm[n]:.1f} s)" for n in names),
              flush=True)
    result.pop("at", None)


def finish(args, result: dict) -> None:
    load_before = result["load_average_before"]
    result["load_average_after"] = os.getloadavg()
    result["note"] = (f"load average {load_before[0]:.1f} before / {result['load_average_after'][0]:.1f} after on "
                      f"{os.cpu_count()} CPUs: other processes shared the cores; compare the ratios, not the rates")
    print(result["note"])
    import json

    from _results import RESULTS

    path = RESULTS / "throughput.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    stored.setdefault("comparisons", {})[f"{args.compare}:{'+'.join(args.scopes)}"] = result
    print("wrote", write_result(stored, "throughput"))


if __name__ == "__main__":
    main()
