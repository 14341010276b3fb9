"""Platform overhead: training throughput of the full stack against plain PyTorch data parallelism doing the same
work on the same cores.

Stack: towerlab.train.driver.train as `towerlab train` runs it: Ray Data decodes, augments and tokenises in
`data.preprocess_concurrency` task processes, Ray Train runs `train.workers` workers of `train.cpus_per_worker`
torch threads, DeepSpeed (the recipe's ZeRO stage, gloo) steps, MLflow (a local sqlite store) logs every
`train.log_every` steps, the system-metrics sampler runs.

Bare: `train.workers` processes started with torch.multiprocessing (spawn), a gloo process group over 127.0.0.1,
the same torch threads per process. Each rank reads its half (rows rank::world) of the same prepared shards through
a torch DataLoader whose workers apply the stack's own `preprocessor(recipe, manifest, train=True)` per batch (the
same decode, augmentation and tokenisation), builds the same module (`build_module` with rank and world size, so
the loss gathers features over ranks as on the stack), the same AdamW and schedule (`build_optimizer`), wraps it in
DistributedDataParallel (gradients averaged over ranks, as DeepSpeed does), clips gradients at optim.grad_clip and
clamps the logit scale after every step. The DataLoaders have `data.preprocess_concurrency` worker processes in
total, but at least one per rank (with fewer, some rank would decode in line and stall the others at every
all-reduce); the JSON records the number.

Timing: both sides run `--warmup` untimed steps, then `--steps` timed ones with the same global batch. The bare side
is timed on rank 0 from the end of the last warm-up step to the end of the last timed step. The stack is timed the
same way from rank 0's MLflow metric timestamps at those two logging steps, so its logging, Ray Train reports and
data waits inside the window count, but no evaluation or checkpoint: those are put after the window (one evaluation
at step end+log_every, one checkpoint at end+2*log_every) and measured on their own as the excess of their logging
interval over the steps' time in it (from the stack's train/samples_per_s of that window). The stack's mean
train/samples_per_s over the timed windows is reported too (it excludes the logging between windows).

The two sides alternate (bare, stack, bare, stack, ...) `--repeats` times; Ray is shut down after every stack run,
so no idle Ray process competes with the bare side. Reported per side: every repeat, the median and the spread
(min-max); the ratio of the medians (stack / bare; goal >= 0.90); the machine's cpu count and 1-minute load average
at the start and the end.

Phases: the bare side always times, per rank and timed step, the wait for the DataLoader (the first batch of an
epoch apart: `data_wait_epoch_start`), forward (with the loss's feature all-gather), backward (with DDP's gradient
all-reduce) and step (clip, AdamW, schedule, clamp). `--profile` times the stack's phases the same way by wrapping,
inside each worker, the names its unchanged loop calls (the dataset shard's iterator, the DeepSpeed engine's
forward, backward and step, the logit-scale clamp, and logging: loss all-reduce, MLflow, ray.train.report).

    .venv/bin/python benchmarks/overhead.py [--profile] [--steps 100] [--warmup 20] [--repeats 3] [--arch digits] [--batch 256]

Writes benchmarks/results/overhead.json (--out elsewhere, e.g. for short trial runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _results import write_result

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ phase timers

class Phases:
    """Seconds per phase of a rank's timed steps (those after `warmup`, up to `warmup + steps`): what --profile
    reports for both sides. `step` is the number of optimizer steps completed so far."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.end = warmup, warmup + steps
        self.step, self.seconds, self.t0, self.t1 = 0, {}, None, None

    def active(self) -> bool:
        return self.warmup <= self.step < self.end

    def add(self, name: str, seconds: float) -> None:
        if self.active():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def stepped(self) -> None:
        self.step += 1
        if self.step == self.warmup:
            self.t0 = time.perf_counter()
        if self.step == self.end:
            self.t1 = time.perf_counter()

    def timed(self, name: str, fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, time.perf_counter() - t)
        return call

    def timed_iter(self, name: str, it):
        """`it`'s items, the time blocked in it added to `name` (to `name`_epoch_start for the first item and the
        iterator's start: an epoch's start-up, separately)."""
        t = time.perf_counter()
        it, first = iter(it), True
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            self.add(f"{name}_epoch_start" if first else name, time.perf_counter() - t)
            first = False
            yield item
            t = time.perf_counter()

    def report(self) -> dict:
        """Milliseconds per timed step by phase; `other` is the rest of the wall time."""
        n = self.end - self.warmup
        wall = (self.t1 - self.t0) if self.t1 else float("nan")
        out = {k: 1000 * v / n for k, v in sorted(self.seconds.items())}
        out["other"] = 1000 * wall / n - sum(out.values())
        out["wall"] = 1000 * wall / n
        return out


# ---------------------------------------------------------------------------------------------------- bare side

class RowShard(torch.utils.data.Dataset):
    """One rank's rows of the raw training split; fetched a batch at a time (`__getitems__`, which torch's
    DataLoader calls with a batch's indices) and preprocessed as a batch, as Ray Data's map_batches does."""

    def __init__(self, table: dict[str, list], rows: np.ndarray, pre):
        self.table, self.rows, self.pre = table, rows, pre

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, idx: list[int]) -> dict:
        rows = self.rows[idx]
        return self.pre({k: [v[i] for i in rows] for k, v in self.table.items()})


def to_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def reseed(worker_id: int) -> None:
    """Each DataLoader worker draws its own augmentations (otherwise every worker holds a copy of one rng state)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.pre.rng = np.random.default_rng(info.seed % 2**32)


def loader_workers(recipe) -> int:
    """DataLoader workers per rank: data.preprocess_concurrency processes in total, at least one per rank."""
    return max(1, round(recipe.data.preprocess_concurrency / recipe.train.workers))


def bare_rank(rank: int, recipe, manifest, warmup: int, steps: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import pyarrow.parquet as pq
    from torch.nn.parallel import DistributedDataParallel

    from towerlab.config import resolve_batch
    from towerlab.data.pipeline import expand_positives, preprocessor
    from towerlab.train.dataset import captions_per_image
    from towerlab.train.module import build_module
    from towerlab.train.optim import build_optimizer

    world = recipe.train.workers
    torch.set_num_threads(recipe.train.cpus_per_worker)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    plan = resolve_batch(recipe.data.global_batch, world, recipe.data.micro_batch)
    if plan.accumulation != 1:
        raise SystemExit("the bare side runs one micro-batch per step: set data.micro_batch to global_batch/workers")
    table = pq.ParquetDataset(manifest.files("train")).read(columns=manifest.columns).to_pydict()
    rows = np.arange(len(next(iter(table.values()))))[rank::world]
    pre = preprocessor(recipe, manifest, train=True, captions_per_image=captions_per_image(recipe))
    n_workers = loader_workers(recipe)
    loader = torch.utils.data.DataLoader(
        RowShard(table, rows, pre), batch_size=plan.micro_batch, shuffle=True, drop_last=True,
        num_workers=n_workers, persistent_workers=n_workers > 0, worker_init_fn=reseed if n_workers else None,
        collate_fn=to_torch, generator=torch.Generator().manual_seed(recipe.seed * 100_003 + rank))

    module = build_module(recipe, rank, world)
    # the one buffer (the text tower's causal mask) is a constant: DeepSpeed does not broadcast it, nor does this
    model = DistributedDataParallel(module, broadcast_buffers=False)
    opt, sched = build_optimizer(module, recipe.optim, recipe.train.steps)
    params = [p for p in module.parameters() if p.requires_grad]
    ph = Phases(warmup, steps)  # a few clock reads per step: always on
    while ph.step < warmup + steps:
        for batch in ph.timed_iter("data_wait", loader):
            t = time.perf_counter()
            batch = expand_positives(batch)
            inputs = {m: batch[m] for m in module.model.towers if m in batch}
            out_ = model(inputs, labels=batch["label"], step=ph.step)  # features all-gathered in the loss
            t, t_ = time.perf_counter(), t
            ph.add("forward", t - t_)
            opt.zero_grad(set_to_none=True)
            out_["loss"].backward()  # DDP's all-reduce of the gradients overlaps it
            t, t_ = time.perf_counter(), t
            ph.add("backward", t - t_)
            torch.nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                module.model.clamp_logit_scale()
            ph.add("step", time.perf_counter() - t)
            ph.stepped()
            if ph.step == warmup + steps:
                break
    Path(f"{out}.rank{rank}").write_text(json.dumps({"seconds": ph.t1 - ph.t0, "loss": float(out_["loss"].detach()),
                                                     "loader_workers_per_rank": n_workers,
                                                     "phases_ms": ph.report()}))
    dist.destroy_process_group()


def bare(recipe, manifest, warmup: int, steps: int, tmp: Path) -> dict:
    """Samples/s of plain PyTorch DDP over the timed steps (and what rank 0 reported)."""
    import torch.multiprocessing as mp

    from towerlab.util import free_port

    out = tmp / f"bare-{time.time_ns()}.json"
    mp.spawn(bare_rank, args=(recipe, manifest, warmup, steps, free_port(), str(out)), nprocs=recipe.train.workers)
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(recipe.train.workers)]
    res = {k: v for k, v in ranks[0].items() if k != "phases_ms"}
    return {"samples_per_s": steps * recipe.data.global_batch / res["seconds"], **res,
            "phases_ms": [r["phases_ms"] for r in ranks]}


# --------------------------------------------------------------------------------------------------- stack side

def profiled_loop(warmup: int, steps: int, out: str):
    """The stack's worker loop with phase timers (--profile): the names loop.py calls are wrapped inside the
    worker, around the unchanged loop. Data wait: time blocked in the dataset shard's iterator; forward, backward
    and step: the DeepSpeed engine's (gradient reduction happens in backward and step under ZeRO-2); log: the
    loss all-reduce, MLflow and ray.train.report at logging steps."""

    def loop(config: dict) -> None:
        import ray.train
        import towerlab.train.loop as L

        ph = Phases(warmup, steps)
        batches, init, step, clamp, open_run, mean = (L.epoch_batches, L.initialize_engine, L.contrastive_step,
                                                      L.clamp_logit_scale, L.open_run, L.mean_over_ranks)
        L.epoch_batches = lambda *a, **k: ph.timed_iter("data_wait", batches(*a, **k))

        def initialize(*a, **k):
            engine, *rest = init(*a, **k)
            for name in ("forward", "backward", "step"):
                setattr(engine, name, ph.timed(name, getattr(engine, name)))
            return (engine, *rest)

        def stepped(*a, **k):
            terms = step(*a, **k)
            ph.stepped()
            return terms

        def run(*a, **k):
            r = open_run(*a, **k)
            r.log_metrics = ph.timed("log", r.log_metrics)
            return r

        L.initialize_engine, L.contrastive_step, L.open_run = initialize, stepped, run
        # after the step counter moved: the clamp belongs to the step just counted
        L.clamp_logit_scale = lambda e: (ph.add("clamp", -time.perf_counter()), clamp(e),
                                         ph.add("clamp", time.perf_counter()))
        L.mean_over_ranks = ph.timed("log", mean)
        ray.train.report = ph.timed("log", ray.train.report)
        L.train_loop_per_worker(config)
        rank = ray.train.get_context().get_world_rank()
        Path(f"{out}.rank{rank}").write_text(json.dumps(ph.report()))

    return loop


def start_ray(recipe, attempts: int = 3) -> None:
    """Ray as train() starts it (train() then uses it), retried: on a loaded machine Ray's own start-up can time out
    ("The current node timed out during startup"), which is no part of what is measured."""
    import ray

    from towerlab.train.ray_env import allocator_env, cpus_needed, init_ray

    allocator_env(recipe)
    for attempt in range(1, attempts + 1):
        try:
            return init_ray(cpus_needed(recipe))
        except Exception as e:  # Ray raises a bare Exception for it
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            print(f"Ray did not start ({e}); retrying", flush=True)
            ray.shutdown()


def stack(recipe, tmp: Path, warmup: int, steps: int, every: int, profile: bool = False) -> dict:
    """Samples/s of towerlab.train.driver.train over the timed steps, and its evaluation and checkpoint pauses."""
    import ray
    from mlflow import MlflowClient

    import towerlab.train.loop
    from towerlab.train.driver import train

    start_ray(recipe)
    original = towerlab.train.loop.train_loop_per_worker
    prof = tmp / f"stack-{time.time_ns()}.json"
    if profile:  # the driver imports the loop when it starts the trainer
        towerlab.train.loop.train_loop_per_worker = profiled_loop(warmup, steps, str(prof))
    try:
        summary = train(recipe, tracking_uri=f"sqlite:///{tmp}/mlruns.db")
    finally:
        towerlab.train.loop.train_loop_per_worker = original
        ray.shutdown()  # no idle Ray left competing with the next bare run
    hist = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "train/samples_per_s")
    sps = {m.step: m.value for m in hist}
    ts = {m.step: m.timestamp / 1000 for m in hist}
    B, end = recipe.data.global_batch, warmup + steps
    ev, ck = end + every, end + 2 * every
    timed = [sps[s] for s in range(warmup + every, end + 1, every)]
    return {"samples_per_s": steps * B / (ts[end] - ts[warmup]),
            "window_samples_per_s": float(np.mean(timed)), "windows": len(timed),
            # an interval's excess over its steps' own time (every * B / the window's samples/s)
            "eval_pause_s": (ts[ev] - ts[ev - every]) - every * B / sps[ev],
            "checkpoint_pause_s": (ts[ck + every] - ts[ck]) - every * B / sps[ck + every],
            "run_id": summary.run_id,
            **({"phases_ms": [json.loads(Path(f"{prof}.rank{r}").read_text()) for r in range(recipe.train.workers)]}
               if profile else {})}


# ---------------------------------------------------------------------------------------------------------- main

def phases(ms: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in ms.items())


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / statistics.median(values)}


def main() -> None:
    from towerlab.train.dataset import ensure_data
    from towerlab.train.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps per run (a multiple of --log-every)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (a multiple of --log-every)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default="digits")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "digits_clip.yaml"))
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/overhead.json)")
    p.add_argument("--profile", action="store_true",
                   help="time the stack's phases too (wraps its loop's calls; the bare side's are always timed)")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value), applied to both sides")
    args = p.parse_args()
    every = args.log_every
    if args.steps % every or args.warmup % every or args.warmup < every:
        p.error("--steps and --warmup must be multiples of --log-every, and --warmup at least one of them")
    load_start = os.getloadavg()[0]
    os.chdir(tempfile.mkdtemp(prefix="towerlab-bench-"))
    tmp = Path.cwd()
    total = args.warmup + args.steps + 3 * every  # then one evaluation, one checkpoint, and the last step

    def recipe_for(i: int):
        return load_recipe(args.recipe, [
            f"model.arch={args.arch}", f"data.global_batch={args.batch}", f"train.steps={total}",
            f"train.log_every={every}", f"eval.every={args.warmup + args.steps + every}",
            f"train.checkpoint_every={args.warmup + args.steps + 2 * every}",
            f"name=overhead{i}", f"data.path={tmp}/data/digits", *args.overrides])  # a new run each repeat

    recipe = recipe_for(0)
    manifest = ensure_data(recipe)
    bares, stacks = [], []
    for i in range(args.repeats):
        bares.append(bare(recipe, manifest, args.warmup, args.steps, tmp))
        print(f"repeat {i + 1}/{args.repeats}: bare {bares[-1]['samples_per_s']:.0f} samples/s; ms per step "
              f"(rank 0) {phases(bares[-1]['phases_ms'][0])}", flush=True)
        stacks.append(stack(recipe_for(i), tmp, args.warmup, args.steps, every, args.profile))
        s = stacks[-1]
        print(f"repeat {i + 1}/{args.repeats}: stack {s['samples_per_s']:.0f} samples/s (windows "
              f"{s['window_samples_per_s']:.0f}), eval pause {s['eval_pause_s']:.2f} s, checkpoint pause "
              f"{s['checkpoint_pause_s']:.2f} s", flush=True)
        if args.profile:
            print(f"repeat {i + 1}/{args.repeats}: stack ms per step (rank 0) {phases(s['phases_ms'][0])}", flush=True)
    b = spread([r["samples_per_s"] for r in bares])
    s = spread([r["samples_per_s"] for r in stacks])
    ratio = s["median"] / b["median"]
    result = {
        "ratio": ratio, "goal": 0.90, "stack": s, "bare": b,
        "stack_windows": spread([r["window_samples_per_s"] for r in stacks]),
        "eval_pause_s": spread([r["eval_pause_s"] for r in stacks]),
        "checkpoint_pause_s": spread([r["checkpoint_pause_s"] for r in stacks]),
        "repeats": {"bare": bares, "stack": stacks},
        "config": {"recipe": Path(args.recipe).name, "arch": args.arch, "global_batch": args.batch,
                   "warmup_steps": args.warmup, "timed_steps": args.steps, "log_every": every,
                   "overrides": args.overrides, "workers": recipe.train.workers,
                   "cpus_per_worker": recipe.train.cpus_per_worker, "zero_stage": recipe.train.zero_stage,
                   "preprocess_concurrency": recipe.data.preprocess_concurrency,
                   "bare_loader_workers_total": loader_workers(recipe) * recipe.train.workers},
        "machine": {"cpus": os.cpu_count(), "load_1min_start": load_start, "load_1min_end": os.getloadavg()[0],
                    "torch": torch.__version__},
    }
    out = write_result(result, path=args.out) if args.out else write_result(result, "overhead")
    print(f"stack {s['median']:.0f} samples/s ({s['min']:.0f}-{s['max']:.0f}), bare PyTorch DDP "
          f"{b['median']:.0f} ({b['min']:.0f}-{b['max']:.0f}), {args.repeats} repeats: ratio {ratio:.2f} "
          f"(goal >= 0.90); eval pause {result['eval_pause_s']['median']:.2f} s, checkpoint pause "
          f"{result['checkpoint_pause_s']['median']:.2f} s; load {load_start:.2f} -> "
          f"{result['machine']['load_1min_end']:.2f} on {os.cpu_count()} cpus -> {out}")


if __name__ == "__main__":
    main()
