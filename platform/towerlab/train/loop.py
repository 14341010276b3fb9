"""The per-worker training loop that Ray Train runs on every worker.

build model + loss -> deepspeed.initialize (ZeRO stage from the recipe, torch AdamW) -> restore the latest Ray Train
checkpoint if any -> for each epoch, stream this worker's shard of the Ray Dataset; every optimizer step: contrastive
step, clamp the logit scale; every N steps: log (rank 0, MLflow), evaluate, checkpoint inside ray.train.report.

DeepSpeed is imported here, inside the worker, never on the driver.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict

import torch

from towerlab import losses
from towerlab.config import Recipe, resolve_batch, to_yaml
from towerlab.data import read_manifest
from towerlab.losses.feature_cache import feature_cache_backward
from towerlab.data.pipeline import epoch_batches, expand_positives, preprocessor
from towerlab.models import ContrastiveModel
from towerlab.tracking import NoopRun, open_run
from towerlab.train.engine import deepspeed_config, initialize_engine
from towerlab.train.evaluate import Evaluators
from towerlab.train.module import ContrastiveTrainModule
from towerlab.train.zero import clamp_logit_scale, construction, fix_logit_scale

CKPT_TAG = "ds"
FAILURE_TAG = "towerlab.failure"
RECIPE_FILE = "recipe.yaml"


def build_module(recipe: Recipe, rank: int, world_size: int, ds_config: dict | None = None,
                 load_weights: bool = True) -> ContrastiveTrainModule:
    """The model and loss; given the DeepSpeed config under ZeRO-3, built inside deepspeed.zero.Init so every
    parameter is partitioned as its module is constructed (no worker holds the whole model). `load_weights=False`:
    pretrained towers get their architecture only (for counting parameters on the meta device)."""
    torch.manual_seed(recipe.seed)  # identical initial weights on every rank
    lc = recipe.loss
    with construction(recipe, ds_config):
        model = ContrastiveModel(recipe.model, temperature_init=lc.temperature_init, bias_init=lc.bias_init,
                                 learn_temperature=lc.learn_temperature, max_logit_scale=lc.max_logit_scale,
                                 load_weights=load_weights)
        loss_fn = losses.build(**asdict(lc))
        return ContrastiveTrainModule(model, loss_fn, rank, world_size)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    recipe: Recipe = config["recipe"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if recipe.train.use_gpu else "cpu")
    if not recipe.train.use_gpu:
        torch.set_num_threads(recipe.train.cpus_per_worker)
    plan = resolve_batch(recipe.data.global_batch, world, recipe.data.micro_batch)
    total = recipe.train.steps
    ds_config = deepspeed_config(recipe, plan)
    module = build_module(recipe, rank, world, ds_config)
    engine, optimizer, scheduler = initialize_engine(recipe, module, ds_config, total)

    # data position: epoch and the micro-batches of it already consumed (a mid-epoch resume skips them)
    state = {"step": 0, "epoch": 0, "batch": 0}
    checkpoint = ray.train.get_checkpoint()  # this run's own latest, after a worker failure or a resume
    if checkpoint is None and config.get("start_checkpoint"):  # where PBT says to start (Train V2 has no argument)
        checkpoint = Checkpoint(config["start_checkpoint"])
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        state.update({k: client.get(k, 0) for k in state})
        if not recipe.loss.learn_temperature:
            fix_logit_scale(engine, recipe.loss.temperature_init)

    run = open_run(config["tracking_uri"], config["run_id"]) if rank == 0 else NoopRun()
    if checkpoint:
        run.log_metrics({"train/restored_step": state["step"]}, state["step"])
    manifest = read_manifest(config["data_dir"])
    eval_pre = preprocessor(recipe, manifest, train=False)
    evaluate = Evaluators(recipe, manifest, eval_pre)

    shard = ray.train.get_dataset_shard("train")
    step, epoch, skip = state["step"], state["epoch"], state["batch"]
    window_start, window_samples = time.perf_counter(), 0
    while step < total:
        micro: list[dict] = []
        consumed = 0  # micro-batches of this epoch taken so far
        for batch in epoch_batches(shard, recipe, plan.micro_batch, epoch):
            consumed += 1
            if consumed <= skip:  # trained on before the checkpoint this run resumed from
                continue
            micro.append(batch)
            if len(micro) < plan.accumulation:
                continue
            terms = contrastive_step(engine, micro, step)
            micro = []
            clamp_logit_scale(engine)
            step += 1
            window_samples += plan.global_batch
            if not all(torch.isfinite(v) for v in terms.values()):
                error = FloatingPointError(f"non-finite loss at step {step}: "
                                           f"{ {k: float(v) for k, v in terms.items()} }; lower optim.lr or check the data")
                # said here, where the cause is known: through Ray Train and Tune it arrives wrapped
                run.set_tags({FAILURE_TAG: f"FloatingPointError: {error}"[:500]})
                raise error
            metrics: dict[str, float] = {}
            last = step == total
            if step % recipe.train.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                metrics.update({f"train/{k}": v for k, v in mean_over_ranks(terms).items()})
                metrics["train/lr"] = scheduler.get_last_lr()[0]
                metrics["train/samples_per_s"] = window_samples / max(elapsed, 1e-9)
                metrics["train/epoch"] = epoch
            metrics.update(evaluate(engine.module.model, step, last))
            if metrics:
                run.log_metrics(metrics, step)
            if step % recipe.train.checkpoint_every == 0 or last:
                tmp = tempfile.mkdtemp(prefix="towerlab-ckpt-")
                # every rank writes its own ZeRO shard; Ray Train gathers all ranks' files into one checkpoint
                engine.save_checkpoint(tmp, tag=CKPT_TAG,
                                       client_state={"step": step, "epoch": epoch, "batch": consumed})
                if rank == 0:  # the checkpoint carries its recipe: `towerlab eval CHECKPOINT` needs nothing else
                    with open(os.path.join(tmp, RECIPE_FILE), "w") as f:
                        f.write(to_yaml(recipe))
                ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(tmp))
                shutil.rmtree(tmp, ignore_errors=True)
            elif metrics:
                ray.train.report({"step": step, **metrics})
            if metrics:
                window_start, window_samples = time.perf_counter(), 0
            if step >= total:
                break
        epoch, skip = epoch + 1, 0
    if rank == 0:
        evaluate.log_plots(run, title=recipe.name)


def mean_over_ranks(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each rank's loss covers its own rows; the logged loss is the global batch's, i.e. the mean over ranks."""
    import torch.distributed as dist

    keys = sorted(terms)
    vec = torch.stack([terms[k].float().reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return dict(zip(keys, vec.tolist()))


def contrastive_step(engine, micro: list[dict], step: int) -> dict[str, torch.Tensor]:
    """One optimizer step over this worker's micro-batches. With one micro-batch: forward, backward, step. With k,
    the feature cache: the loss sees all k micro-batches of every rank as negatives (the whole global batch), and
    DeepSpeed steps at its accumulation boundary after the k-th backward."""
    micro = [expand_positives(b) for b in micro]  # k captions per image -> k positive pairs per image
    towers = engine.module.model.towers
    inputs = [{m: b[m] for m in towers if m in b} for b in micro]  # image, text and (synthetic3) signal
    if len(micro) == 1:
        out = engine(inputs[0], labels=micro[0]["label"], step=step)
        engine.backward(out["loss"])
        engine.step()
        return {k: v.detach() for k, v in out.items()}
    module: ContrastiveTrainModule = engine.module
    labels = torch.cat([b["label"] for b in micro])  # the cache concatenates micro-batches in this order

    def backward(surrogate: torch.Tensor, i: int, last: bool) -> None:
        engine.backward(surrogate, scale_wrt_gas=False)  # the surrogate already carries the full gradient
        engine.step()  # counts the micro-step; updates only at the k-th

    # encode through the engine's forward: under ZeRO-3 a direct call of the module left the gradients of the
    # accumulated micro-batches wrong (seen: ZeRO-3 losses diverged from ZeRO-0 from the second step)
    encode = lambda x: engine(x, features_only=True)  # noqa: E731
    return feature_cache_backward(encode, inputs, lambda f: module.loss(f, labels, step),
                                  params=module.loss_parameters(), backward_fn=backward)
