"""The GPU device check's work (benchmarks/device_check.sh runs it): the GPU path, which the CPU machines only test
on twins (meta-device and bf16-on-CPU tests), run for real on one GPU, with figures to keep.

Sections (each timed, each recorded even when it fails, so one failure does not hide the rest):

1. train_debug_zero2 / train_debug_zero3: `towerlab train recipes/debug.yaml` on 1 GPU (Ray Train, NCCL, DeepSpeed
   bf16) at ZeRO-2 and ZeRO-3: the whole stack, data prepared locally, MLflow in a temporary SQLite store.
2. loss_parity: every family with a tiled kernel, full matrix vs tiled, fp32 features on the GPU: loss and feature
   gradients (max abs difference; the CPU tests hold them to 1e-5).
3. tiled_vs_full: the tiled CLIP loss at a 65,536 batch (forward + backward time, peak memory), and the full matrix
   at the largest power-of-two batch that fits (doubling from 4,096 until out of memory).
4. vit_b32: ViT-B/32 + its text tower training steps (bf16 autocast, fused AdamW) at batch 256: samples/s and model
   FLOPs utilisation against the GPU's bf16 peak (FLOPs from towerlab.train.flops, as `towerlab plan` counts them),
   eager and compiled, with and without patch dropout 0.5.

    PYTHONPATH=platform .venv/bin/python benchmarks/device_check.py [--device cuda] [--smoke] [--only SECTION...]

`--device cpu --smoke` runs sections 2-4 tiny on the CPU (the helper's own check, on a machine without a GPU).
Writes benchmarks/results/device_check.json (the GPU's name first); `towerlab plan` reads the ViT-B/32 MFU from it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _results import RESULTS, write_result

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from towerlab import losses  # noqa: E402
from towerlab.train.flops import peak_tflops_or_none, tower_flops  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_debug(stage: int, smoke: bool) -> dict:
    """The real stack on one GPU: Ray Train worker, NCCL, DeepSpeed bf16 at ZeRO-`stage`."""
    with tempfile.TemporaryDirectory(prefix="towerlab-device-check-") as d:
        cmd = [sys.executable, "-m", "towerlab.cli", "train", "recipes/debug.yaml", "--no-progress",
               "--tracking-uri", f"sqlite:///{d}/mlruns.db", "train.use_gpu=true", "train.workers=1",
               f"train.zero_stage={stage}", f"train.storage_path={d}/results", f"name=device_check_zero{stage}",
               "train.steps=10" if not smoke else "train.steps=2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), "RAY_USAGE_STATS_ENABLED": "0"}
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        out = {"command": " ".join(cmd[1:]), "exit_code": p.returncode, "seconds": time.perf_counter() - t0,
               "output_tail": (p.stdout + p.stderr).splitlines()[-15:]}
        try:
            from mlflow import MlflowClient

            client = MlflowClient(f"sqlite:///{d}/mlruns.db")
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs:
                out["final_metrics"] = {k: v for k, v in runs[0].data.metrics.items()
                                        if k in ("train/loss", "train/samples_per_s", "eval/zeroshot/top1")}
        except Exception as e:  # the exit code above is the verdict; the metrics are extra
            out["final_metrics_error"] = repr(e)
        return out


def loss_parity(device: str, smoke: bool) -> dict:
    n, d = (64, 16) if smoke else (4096, 512)
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name in sorted(n_ for n_ in losses.LOSSES.names() if losses.LOSSES.get(n_).supports_tiled):
        row = {}
        results = []
        x0 = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=-1)
        y0 = torch.nn.functional.normalize(x0 + torch.randn(n, d, device=device, generator=g), dim=-1)
        for tiled in (False, True):
            fn = losses.build(name, tiled=tiled, tile_size=16 if smoke else 1024).to(device)
            x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
            scale = torch.tensor(1 / fn.cfg.temperature_init, device=device)
            bias = None if fn.cfg.bias_init is None else torch.tensor(fn.cfg.bias_init, device=device)
            res = fn({"image": x, "text": y}, logit_scale=scale, logit_bias=bias)
            gx, gy = torch.autograd.grad(res["loss"], [x, y])
            results.append((res["loss"].detach(), gx, gy))
        (l0, gx0, gy0), (l1, gx1, gy1) = results
        row["loss_full"] = float(l0)
        row["loss_abs_diff"] = float((l0 - l1).abs())
        row["grad_max_abs_diff"] = float(max((gx0 - gx1).abs().max(), (gy0 - gy1).abs().max()))
        row["ok"] = row["loss_abs_diff"] <= 1e-4 * max(1.0, abs(row["loss_full"])) and row["grad_max_abs_diff"] <= 1e-5
        out[name] = row
    return out


def _clip_fwd_bwd(n: int, d: int, tiled: bool, device: str) -> dict:
    reset_memory(device)
    fn = losses.build("clip", tiled=tiled, tile_size=4096 if n >= 4096 else 64).to(device)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device)
    sync(device)
    t0 = time.perf_counter()
    loss = fn({"image": x, "text": y}, logit_scale=scale)["loss"]
    loss.backward()
    sync(device)
    return {"batch": n, "seconds": time.perf_counter() - t0, "peak_gib": peak_memory(device),
            "loss": float(loss.detach())}


def tiled_vs_full(device: str, smoke: bool) -> dict:
    d = 512 if not smoke else 32
    big = 65_536 if not smoke else 1024
    _clip_fwd_bwd(4096 if not smoke else 256, d, True, device)  # warm-up: kernels, allocator
    out = {"embed_dim": d, "tiled": _clip_fwd_bwd(big, d, True, device)}
    n, largest = 4096 if not smoke else 128, None
    while n <= big:
        try:
            largest = _clip_fwd_bwd(n, d, False, device)
        except torch.OutOfMemoryError:
            break
        n *= 2
    out["full_largest_that_fits"] = largest
    if largest and largest["batch"] < big:
        out["full_out_of_memory_at"] = n
    reset_memory(device)
    return out


def vit_b32(device: str, smoke: bool, steps: int) -> dict:
    from towerlab.train.module import build_module
    from towerlab.train.optim import build_optimizer
    from towerlab.train.recipe import load_recipe

    batch = 256 if not smoke else 4
    arch = "ViT-B-32" if not smoke else "debug"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = peak_tflops_or_none(name)
    runs = []
    for compiled in (False, True):
        for drop in (0.0, 0.5):
            key = f"compile={str(compiled).lower()},patch_dropout={drop > 0}"
            try:
                r = load_recipe(ROOT / "recipes" / "debug.yaml",
                                ["train.workers=1", f"model.arch={arch}", f"model.vision.patch_dropout={drop}",
                                 f"train.compile={str(compiled).lower()}",
                                 f"optim.implementation={'fused' if device == 'cuda' else 'auto'}"])
                flops = sum(tower_flops(r).values())  # model FLOPs per sample, forward + backward
                module = build_module(r, 0, 1).to(device)
                opt, _ = build_optimizer(module, r.optim, 100)
                v, t = r.model.vision, r.model.text
                images = torch.randn(batch, 3, v.image_size, v.image_size, device=device)
                tokens = torch.randint(3, t.vocab_size, (batch, t.context_length), device=device)

                def step() -> None:
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                        loss = module({"image": images, "text": tokens})["loss"]
                    loss.backward()
                    opt.step()

                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                sync(device)
                warm = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(device)
                sps = steps * batch / (time.perf_counter() - t0)
                runs.append({"key": key, "compile": compiled, "patch_dropout": drop, "samples_per_s": sps,
                             "warmup_s": warm, "model_tflop_per_sample": flops / 1e12,
                             "mfu": sps * flops / (peak * 1e12) if peak else None})
                del module, opt
                reset_memory(device)
            except Exception as e:
                runs.append({"key": key, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"  vit_b32 {runs[-1]}", flush=True)
    return {"arch": arch, "batch": batch, "steps": steps, "precision": "bf16 autocast" if device == "cuda" else "fp32",
            "peak_bf16_tflops": peak, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (checks this script, measures nothing)")
    ap.add_argument("--only", nargs="*", help="sections to run (default: all)")
    ap.add_argument("--steps", type=int, default=20, help="timed ViT-B/32 steps per configuration")
    ap.add_argument("--out", help="results file (default: benchmarks/results/device_check.json)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: no CUDA GPU visible to torch; run it on a GPU machine (or --device cpu --smoke)",
              file=sys.stderr)
        return 2
    dev = args.device
    result: dict = {"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "none (cpu smoke run)",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    sections = {
        "train_debug_zero2": lambda: train_debug(2, args.smoke),
        "train_debug_zero3": lambda: train_debug(3, args.smoke),
        "loss_parity": lambda: loss_parity(dev, args.smoke),
        "tiled_vs_full": lambda: tiled_vs_full(dev, args.smoke),
        "vit_b32": lambda: vit_b32(dev, args.smoke, args.steps if not args.smoke else 2),
    }
    chosen = args.only or [s for s in sections if dev == "cuda" or not s.startswith("train_")]
    failed = []
    for name in chosen:
        t0 = time.perf_counter()
        print(f"device_check: {name} ...", flush=True)
        try:
            out = sections[name]()
            ok = not (isinstance(out, dict) and out.get("exit_code"))
        except Exception:
            out, ok = {"error": traceback.format_exc()[-2000:]}, False
        if name == "loss_parity" and ok:
            ok = all(r["ok"] for r in out.values())
        result["sections"][name] = {"ok": ok, "seconds": time.perf_counter() - t0, **(
            out if name != "loss_parity" else {"families": out})}
        if name == "vit_b32":
            result["vit_b32"] = out  # where `towerlab plan` reads the measured MFU
        print(f"device_check: {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
        if not ok:
            failed.append(name)
    path = write_result(result, path=args.out or RESULTS / "device_check.json")
    print(f"device_check: wrote {path}; {'all sections ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
