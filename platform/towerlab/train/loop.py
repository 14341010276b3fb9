"""The per-worker training loop that Ray Train runs on every worker.

build model + loss -> deepspeed.initialize (ZeRO stage from the recipe, torch AdamW) -> restore the latest Ray Train
checkpoint if any -> for each epoch, stream this worker's shard of the Ray Dataset; every optimizer step: contrastive
step, clamp the logit scale; every N steps: log (rank 0, MLflow), evaluate, checkpoint inside ray.train.report.

DeepSpeed is imported here, inside the worker, never on the driver.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from towerlab.config import Recipe, resolve_batch
from towerlab.data import read_manifest
from towerlab.data.pipeline import EarlyStart, epoch_batches, preprocessor
from towerlab.tracking import NoopRun, open_run
from towerlab.tracking.system_metrics import SystemMetrics
from towerlab.tracking.tags import FAILURE
from towerlab.train.checkpoint import CKPT_TAG, save_checkpoint
from towerlab.train.deepspeed_config import deepspeed_config
from towerlab.train.engine import clamp_logit_scale, fix_logit_scale, initialize_engine
from towerlab.train.evaluate import Evaluators
from towerlab.train.module import build_module
from towerlab.train.startup import Timeline
from towerlab.train.step import contrastive_step, mean_over_ranks
from towerlab.util import redirect_output


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on every worker. `config` holds the resolved `recipe`, the MLflow `tracking_uri` and
    `run_id` (rank 0 logs to it), the prepared `data_dir` (its manifest; the rows arrive through Ray Data's
    dataset shard "train") and an optional `start_checkpoint` (population-based training's hand-over).

    Resumes from this run's latest Ray Train checkpoint when there is one, skipping the micro-batches of the
    interrupted epoch already trained on; raises FloatingPointError (tagged on the MLflow run) on a non-finite loss."""
    import ray.train

    recipe: Recipe = config["recipe"]
    timeline = Timeline(*config.get("startup") or (None, None))
    timeline.mark("workers")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("log_dir"):  # not streamed to the console (no -v): kept in the run directory
        redirect_output(Path(config["log_dir"]) / f"rank{rank}.log")
    # one monitor per node: the first worker of each samples the node's CPU, memory and GPUs into the run, from
    # before the model is built (its cost shows too) to the end, failed or not: stopped before the worker returns,
    # so none is left logging into the run the driver is about to end
    monitor = SystemMetrics(config.get("tracking_uri"), config.get("run_id"),
                            recipe.tracking.system_metrics_every if ctx.get_local_rank() == 0 else 0).start()
    try:
        _train(config, recipe, ctx, rank, world, timeline)
    finally:
        monitor.stop()


def _train(config: dict, recipe: Recipe, ctx, rank: int, world: int, timeline: Timeline) -> None:
    """The training itself (train_loop_per_worker's docstring)."""
    import ray.train
    from ray.train import Checkpoint

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if recipe.train.use_gpu else "cpu")
    if not recipe.train.use_gpu:
        torch.set_num_threads(recipe.train.cpus_per_worker)
    plan = resolve_batch(recipe.data.global_batch, world, recipe.data.micro_batch)
    total = recipe.train.steps
    ds_config = deepspeed_config(recipe, plan)
    checkpoint = ray.train.get_checkpoint()  # this run's own latest, after a worker failure or a resume
    if checkpoint is None and config.get("start_checkpoint"):  # where PBT says to start (Train V2 has no argument)
        checkpoint = Checkpoint(config["start_checkpoint"])
    shard = ray.train.get_dataset_shard("train")
    # a fresh run starts its data now: Ray Data's coordinator and preprocessing processes start while the model and
    # the DeepSpeed engine are built, not after (a resumed run's position is known only from its checkpoint)
    # one pass over every epoch (train_dataset's TrainData): an epoch is epoch_samples of it, and the pass starts at
    # the run's sample count `start` (where the checkpoint a resumed run starts from stopped)
    epoch_samples, start = config.get("epoch_samples", 0), config.get("start_samples", 0)
    one_pass = epoch_samples > 0
    early = EarlyStart(epoch_batches(shard, recipe, plan.micro_batch, 0, shuffle=not one_pass)) \
        if checkpoint is None else None
    module = build_module(recipe, rank, world, ds_config)
    timeline.mark("model")
    engine, optimizer, scheduler = initialize_engine(recipe, module, ds_config, total)

    # data position: epoch and the micro-batches of it already consumed (a mid-epoch resume skips them)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        state.update({k: client.get(k, 0) for k in state})
        if not recipe.loss.learn_temperature:
            fix_logit_scale(engine, recipe.loss.temperature_init)
    timeline.mark("engine")  # built, and restored from a checkpoint if there is one

    run = open_run(config["tracking_uri"], config["run_id"]) if rank == 0 else NoopRun()
    if checkpoint:
        run.log_metrics({"train/restored_step": state["step"]}, state["step"])
    manifest = config.get("manifest") or read_manifest(config["data_dir"])
    eval_pre = preprocessor(recipe, manifest, train=False)
    evaluate = Evaluators(recipe, manifest, eval_pre)
    timeline.mark("evaluators")

    step, epoch, skip = state["step"], state["epoch"], state["batch"]
    if one_pass:  # this worker's micro-batches of the pass that the checkpoint's steps trained on
        skip = max(0, step * plan.global_batch - start) // (plan.micro_batch * world)
    window_start, window_samples = time.perf_counter(), 0
    foreign = manifest.foreign  # web data: dirty samples are skipped, counted per epoch
    while step < total:
        micro: list[dict] = []
        consumed = 0  # micro-batches of this epoch taken so far
        skipped = 0  # dirty samples dropped before this worker's batches of this epoch
        batches = early.take() if early is not None else \
            epoch_batches(shard, recipe, plan.micro_batch, epoch, shuffle=not one_pass)
        early = None
        for batch in batches:
            consumed += 1
            if "skipped" in batch:
                skipped += int(batch.pop("skipped").sum())
            if consumed <= skip:  # trained on before the checkpoint this run resumed from
                continue
            if "first_batch" not in timeline.marks:
                timeline.mark("first_batch")
            micro.append(batch)
            if len(micro) < plan.accumulation:
                continue
            terms = contrastive_step(engine, micro, step)
            micro = []
            if "first_step" not in timeline.marks:
                timeline.mark("first_step")
                run.log_metrics(timeline.metrics(), step)
            clamp_logit_scale(engine)
            step += 1
            window_samples += plan.global_batch
            if not all(torch.isfinite(v) for v in terms.values()):
                error = FloatingPointError(f"non-finite loss at step {step}: "
                                           f"{ {k: float(v) for k, v in terms.items()} }; lower optim.lr or check the data")
                # said here, where the cause is known: through Ray Train and Tune it arrives wrapped
                run.set_tags({FAILURE: f"FloatingPointError: {error}"[:500]})
                raise error
            metrics: dict[str, float] = {}
            last = step == total
            if step % recipe.train.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                # the skip count rides on the same collective as the loss terms (every rank logs at the same steps)
                extra = {"_skipped": torch.tensor(float(skipped))} if foreign else {}
                means = mean_over_ranks({**terms, **extra})
                if foreign:
                    metrics["data/skipped_samples_epoch"] = means.pop("_skipped") * world
                metrics.update({f"train/{k}": v for k, v in means.items()})
                metrics["train/lr"] = scheduler.get_last_lr()[0]
                metrics["train/samples_per_s"] = window_samples / max(elapsed, 1e-9)
                metrics["train/epoch"] = step * plan.global_batch // epoch_samples if epoch_samples else epoch
                metrics["train/samples"] = step * plan.global_batch
            metrics.update(evaluate(engine.module.model, step, last))
            if metrics:
                run.log_metrics(metrics, step)
            # a scheduler's time axis: steps, or samples seen (equal data across batch sizes)
            progress = {"step": step, "samples": step * plan.global_batch}
            if step % recipe.train.checkpoint_every == 0 or last:
                save_checkpoint(engine, recipe, rank, {"step": step, "epoch": epoch, "batch": consumed,
                                                      "samples": step * plan.global_batch},
                                lambda ckpt, name: ray.train.report({**progress, **metrics}, checkpoint=ckpt,
                                                                    checkpoint_dir_name=name),
                                storage=ctx.get_storage())
            elif metrics:
                ray.train.report({**progress, **metrics})
            if metrics:
                window_start, window_samples = time.perf_counter(), 0
            if step >= total:
                break
        epoch, skip = epoch + 1, 0
    if rank == 0:
        evaluate.log_plots(run, title=recipe.name)
        evaluate.log_results(run, model=recipe.model.arch, pretrained=f"{recipe.name}@step{step}")
        run.flush()  # metrics buffered through a tracking-store outage go out before the worker ends
