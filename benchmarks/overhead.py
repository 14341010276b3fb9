"""Platform overhead: samples/s of the full stack (Ray Data -> Ray Train -> DeepSpeed ZeRO, 2 workers x 1 core)
against a bare single-process PyTorch loop (2 threads) over the same model, loss and data on the same cores.

The stack runs 2 workers x 1 thread (DeepSpeed ZeRO-2 over gloo) while Ray Data decodes in its own process, so
decoding overlaps compute there; the bare loop (2 torch threads) decodes in line. Both do the same work per step: decode + augment + tokenize every sample, forward both towers, symmetric InfoNCE over
the global batch, backward, AdamW step. The bare loop decodes in-process with the same Preprocessor; the stack gets
its batches from Ray Data. Throughput is taken after a warm-up (the stack's first logging window, and the bare loop's
first `warmup` steps, are excluded).

    .venv/bin/python benchmarks/overhead.py [--steps 120] [--arch digits] [--batch 256]

Writes benchmarks/results/overhead.json. Goal: ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _results import write_result

import numpy as np
import pyarrow.parquet as pq
import torch

from towerlab import losses
from towerlab.train.dataset import ensure_data
from towerlab.train.driver import train
from towerlab.train.module import build_module
from towerlab.train.optim import build_optimizer
from towerlab.train.recipe import load_recipe
from towerlab.data.pipeline import preprocessor

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(recipe, manifest, steps: int, warmup: int, predecoded: bool = False) -> float:
    """Samples/s of a plain PyTorch loop: same module, optimizer, loss, preprocessing; no Ray, no DeepSpeed.
    With `predecoded`, images are decoded once (no augmentation) before timing: the loop then does less work than
    the stack, which bounds the overhead from the other side."""
    torch.set_num_threads(2)
    module = build_module(recipe, rank=0, world_size=1)
    opt, sched = build_optimizer(module, recipe.optim, recipe.train.steps)
    pre = preprocessor(recipe, manifest, train=True)
    table = pq.ParquetDataset(manifest.files("train")).read(columns=["image", "caption", "label"]).to_pydict()
    n, B = len(table["label"]), recipe.data.global_batch
    rng = np.random.default_rng(0)
    cached = preprocessor(recipe, manifest, train=False)(table) if predecoded else None
    done, t0 = 0, None
    while done < steps + warmup:
        order = rng.permutation(n)
        for start in range(0, n - B + 1, B):
            if done == warmup:
                t0 = time.perf_counter()
            idx = order[start : start + B]
            if cached is not None:
                batch = {k: v[idx] for k, v in cached.items()}
            else:
                batch = pre({k: [table[k][i] for i in idx] for k in table})
            out = module({"image": torch.from_numpy(batch["image"]), "text": torch.from_numpy(batch["text"])},
                         labels=torch.from_numpy(batch["label"]))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), recipe.optim.grad_clip)
            opt.step()
            sched.step()
            module.model.clamp_logit_scale()
            done += 1
            if done == steps + warmup:
                break
    return steps * B / (time.perf_counter() - t0)


def stack(recipe, tmp: Path) -> tuple[float, int]:
    from mlflow import MlflowClient

    summary = train(recipe, tracking_uri=f"sqlite:///{tmp}/mlruns.db")
    hist = sorted(MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "train/samples_per_s"),
                  key=lambda m: m.step)
    windows = [m.value for m in hist[1:-1]] or [m.value for m in hist]  # drop warm-up and the final (eval) window
    return float(np.mean(windows)), len(windows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--arch", default="digits")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    os.chdir(tempfile.mkdtemp(prefix="towerlab-bench-"))
    tmp = Path.cwd()
    recipe = load_recipe(ROOT / "recipes" / "digits_clip.yaml", [
        f"model.arch={args.arch}", f"data.global_batch={args.batch}", f"train.steps={args.steps}",
        "train.log_every=10", f"eval.every={args.steps}", f"train.checkpoint_every={args.steps}",
        "name=overhead", f"data.path={tmp}/data/digits"])
    manifest = ensure_data(recipe)
    # the bare loops run first, with no Ray process alive to compete for the cores
    bare_sps = bare_loop(recipe, manifest, steps=min(args.steps, 60), warmup=5)
    bare_pre_sps = bare_loop(recipe, manifest, steps=min(args.steps, 60), warmup=5, predecoded=True)
    stack_sps, windows = stack(recipe, tmp)
    ratio = stack_sps / bare_sps
    result = {"stack_samples_per_s": stack_sps, "bare_samples_per_s": bare_sps, "ratio": ratio, "goal": 0.90,
              "bare_predecoded_samples_per_s": bare_pre_sps, "ratio_vs_predecoded": stack_sps / bare_pre_sps,
              "arch": args.arch, "global_batch": args.batch, "stack_steps": args.steps, "stack_windows": windows,
              "workers": recipe.train.workers, "zero_stage": recipe.train.zero_stage, "cpus": os.cpu_count(),
              "torch": torch.__version__}
    out = write_result(result, "overhead")
    print(f"full stack {stack_sps:.0f} samples/s, bare PyTorch {bare_sps:.0f} samples/s: ratio {ratio:.2f} "
          f"(goal >= 0.90); vs a bare loop on pre-decoded, unaugmented data ({bare_pre_sps:.0f} samples/s): "
          f"{stack_sps / bare_pre_sps:.2f} -> {out}")


if __name__ == "__main__":
    main()
