"""ZeRO memory on this machine: peak memory per Ray Train worker (CPU workers, DeepSpeed over gloo, fp32).

(b) stages: the same two-tower model (ViT-B/32-class towers at a small image size, ~150M parameters) trained a few
    steps under ZeRO stages 0, 2 and 3, on 2 workers and again on 4 (2 samples per worker either way); per-worker
    peak RSS, and the part of it the training added (peak minus the worker's RSS before the model was built), as
    ratios to stage 0 on as many workers, measured in the same run. Goal: stage 3 <= 0.55x. Each worker's RSS and
    high-water mark after building, after deepspeed.initialize and after every step are kept (`phases`): where the
    peak is reached.
(a) billion: a >= 1.0B-parameter two-tower (ViT-g/14 towers at image size 56, context 16: 1.36B parameters) trains
    2 steps under ZeRO-Infinity (ZeRO-3 built under zero.Init, optimizer state offloaded to local disk through
    DeepSpeed's AdamW and libaio, sub_group_size 5e7); per-worker peak GiB and seconds per step.

Both parts run with MALLOC_MMAP_THRESHOLD_=131072 (set below unless given): without it, glibc's heap fragmentation
under ZeRO-3 costs about 1 GiB per worker in (b) and pushed (a) past this machine's memory. It costs time, as every
large tensor then comes fresh from the kernel: `--glibc-default` runs (b) without it (JSON key `..._glibc_default`)
to show both sides.

Every run goes through the platform's own pieces: the recipe loader, deepspeed_config/zero_section, build_module
(zero.Init), optimizer_args, contrastive_step (feature cache when accumulating) and the logit-scale clamp, in a
TorchTrainer on a local Ray. Inputs are random tensors made in each worker (no Ray Data): the point is the model
state, not ingest. Nothing is checkpointed.

    .venv/bin/python benchmarks/zero_memory.py [--part b|a|both] [--steps 3] [--workers 2,4] [--glibc-default]

Writes benchmarks/results/zero_memory.json (each part updates its own keys: `stages` for 2 workers, `stages_4_workers`,
`billion`). Part (a) needs about 9 GiB per worker and Debian's libaio-dev; run it when nothing else big is running.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _results import write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "zero_memory.json"
GiB = 1 << 30

STAGE_MODEL = ["model.arch=ViT-B-32", "model.vision.image_size=64", "model.text.context_length=16"]
BILLION_MODEL = ["model.arch=ViT-g-14", "model.vision.image_size=56", "model.text.context_length=16",
                 "train.zero_stage=3", "train.offload_optimizer=nvme",
                 "train.sub_group_size=50000000"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_worker(config: dict) -> None:
    """One Ray Train worker: build the engine as train/loop.py does, train `steps` steps on random inputs, report
    (from rank 0) every rank's peak RSS, its RSS before building, and the seconds of each step."""
    import resource
    import time

    import ray.train
    import torch

    recipe = config["recipe"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (imported before the baseline: "added" is the training state, not the import)
    import torch.distributed as dist

    from towerlab.config import resolve_batch
    from towerlab.train.deepspeed_config import deepspeed_config
    from towerlab.train.engine import initialize_engine
    from towerlab.train.module import build_module
    from towerlab.train.step import contrastive_step
    from towerlab.train.engine import clamp_logit_scale

    torch.set_num_threads(recipe.train.cpus_per_worker)
    base = _rss()
    plan = resolve_batch(recipe.data.global_batch, world, recipe.data.micro_batch)
    ds_config = deepspeed_config(recipe, plan)
    phases = {}

    def mark(name):  # RSS now and the high-water mark so far, to show where the peak is reached
        phases[name] = {"rss_gib": round(_rss() / GiB, 3),
                        "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 3)}

    mark("start")
    module = build_module(recipe, rank, world, ds_config)
    mark("built")
    params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    engine, *_ = initialize_engine(recipe, module, ds_config, config["steps"])
    mark("initialized")
    v, t = recipe.model.vision, recipe.model.text
    g = torch.Generator().manual_seed(rank)
    n = plan.micro_batch
    micro = [{"image": torch.randn(n, 3, v.image_size, v.image_size, generator=g),
              "text": torch.randint(3, t.vocab_size, (n, t.context_length), generator=g),
              "label": torch.arange(n) + rank * n} for _ in range(plan.accumulation)]
    times, losses = [], []
    for step in range(config["steps"]):
        t0 = time.perf_counter()
        terms = contrastive_step(engine, micro, step)
        clamp_logit_scale(engine)
        times.append(time.perf_counter() - t0)
        losses.append(float(terms["loss"]))
        mark(f"step{step}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    mine = {"rank": rank, "peak_gib": peak / GiB, "base_gib": base / GiB, "step_s": times, "loss": losses,
            "params": params, "phases": phases}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:  # Ray Train V2 keeps metrics only with checkpoints: the (local) driver reads this file
        tmp = config["out"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(everyone, f)
        os.replace(tmp, config["out"])


def run(overrides: list[str], steps: int, storage: str, workers: int = 2) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from towerlab.train.ray_env import init_ray
    from towerlab.train.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "debug.yaml",
                         [f"train.workers={workers}", f"data.global_batch={2 * workers}", "eval.every=1000",
                          *overrides])
    init_ray(recipe.train.workers * recipe.train.cpus_per_worker + 1)
    out = os.path.join(storage, f"workers-{len(os.listdir(storage))}.json")
    trainer = TorchTrainer(
        bench_worker, train_loop_config={"recipe": recipe, "steps": steps, "out": out},
        scaling_config=ray.train.ScalingConfig(num_workers=recipe.train.workers, use_gpu=False,
                                               resources_per_worker={"CPU": recipe.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"zero-{workers}w-{abs(hash(tuple(overrides)))}", storage_path=storage))
    trainer.fit()
    with open(out) as f:
        reports = json.load(f)
    return {
        "params": reports[0]["params"],
        "peak_gib_per_worker": max(w["peak_gib"] for w in reports),
        "added_gib_per_worker": max(w["peak_gib"] - w["base_gib"] for w in reports),
        "s_per_step": [round(s, 2) for s in reports[0]["step_s"]],
        "loss": reports[0]["loss"],
        "phases": reports[0]["phases"],
    }


def part_b(steps: int, storage: str, workers: int) -> dict:
    out: dict = {"model": " ".join(STAGE_MODEL), "workers": workers, "stages": {}}
    for stage in (0, 2, 3):
        r = run([*STAGE_MODEL, f"train.zero_stage={stage}"], steps, storage, workers)
        out["stages"][str(stage)] = {k: r[k] for k in ("params", "peak_gib_per_worker", "added_gib_per_worker",
                                                       "s_per_step", "loss", "phases")}
        print(f"{workers} workers, ZeRO-{stage}: {r['params']:,} parameters, peak {r['peak_gib_per_worker']:.2f} GiB "
              f"per worker ({r['added_gib_per_worker']:.2f} GiB added by training), s/step {r['s_per_step']}",
              flush=True)
    s0 = out["stages"]["0"]
    for stage in ("2", "3"):
        s = out["stages"][stage]
        s["ratio_peak_to_stage0"] = round(s["peak_gib_per_worker"] / s0["peak_gib_per_worker"], 3)
        s["ratio_added_to_stage0"] = round(s["added_gib_per_worker"] / s0["added_gib_per_worker"], 3)
        print(f"{workers} workers, ZeRO-{stage} / ZeRO-0 per worker: peak {s['ratio_peak_to_stage0']}x, added "
              f"{s['ratio_added_to_stage0']}x", flush=True)
    out["goal"] = "stage 3 <= 0.55x stage 0 per worker"
    out["goal_met_peak"] = out["stages"]["3"]["ratio_peak_to_stage0"] <= 0.55
    out["goal_met_added"] = out["stages"]["3"]["ratio_added_to_stage0"] <= 0.55
    return out


def part_a(steps: int, storage: str, nvme: str) -> dict:
    r = run([*BILLION_MODEL, f"train.nvme_path={nvme}"], steps, storage)
    print(f"ZeRO-Infinity: {r['params']:,} parameters, 2 CPU workers: peak {r['peak_gib_per_worker']:.2f} GiB per "
          f"worker, s/step {r['s_per_step']}", flush=True)
    return {"model": " ".join(BILLION_MODEL), "params": r["params"], "peak_gib_per_worker": r["peak_gib_per_worker"],
            "added_gib_per_worker": r["added_gib_per_worker"], "s_per_step": r["s_per_step"], "loss": r["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--steps", type=int, default=3, help="steps per stage in part (b); part (a) always runs 2")
    ap.add_argument("--workers", default="2,4", help="worker counts for part (b), comma-separated")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc settings alone")
    ap.add_argument("--nvme", default="/tmp/towerlab-nvme", help="directory for the offloaded optimizer state")
    args = ap.parse_args()
    from towerlab.train.ray_env import MMAP_THRESHOLD, init_ray

    # glibc returns freed blocks above this size to the system at once. Its default threshold adapts upwards, and
    # ZeRO-3's gather/free cycles then fragment the heap: the 1.37B run of part (a) grew to 10 GiB per worker and was
    # OOM-killed; with 128 KiB it peaked at 7.2 GiB. Inherited by the local Ray's workers, started below.
    if args.glibc_default:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    else:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    counts = [int(n) for n in args.workers.split(",")]
    init_ray(max(counts) + 1)  # one local Ray for every run: room for the most workers (1 CPU each) asked for
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    suffix = "_glibc_default" if args.glibc_default else ""
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as storage:
        for n in counts if args.part in ("b", "both") else []:
            key = ("stages" if n == 2 else f"stages_{n}_workers") + suffix
            result[key] = {**part_b(args.steps, storage, n), "malloc_mmap_threshold": _mmap_threshold()}
            _write(result)
        if args.part in ("a", "both"):
            result["billion" + suffix] = {**part_a(2, storage, args.nvme), "malloc_mmap_threshold": _mmap_threshold()}
            _write(result)


def _mmap_threshold() -> str | None:  # what the measured workers ran with
    return os.environ.get("MALLOC_MMAP_THRESHOLD_")


def _write(result: dict) -> None:
    print(f"wrote {write_result(result, path=OUT)}")


if __name__ == "__main__":
    main()
