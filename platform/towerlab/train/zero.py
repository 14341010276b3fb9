"""ZeRO-3 and offload: what the recipe's train section turns into for DeepSpeed, and the pieces around it.

- `zero_section`: the zero_optimization block (stage, ZeRO-3 persistence and sub-groups, optimizer/parameter
  offload to cpu or nvme). Parameters up to `PERSISTENCE_THRESHOLD` elements stay whole on every rank under ZeRO-3
  (DeepSpeed's stage3_param_persistence_threshold): the logit scale and bias (one element each) are therefore never
  partitioned, so the loss, which reads them outside the model's forward, always sees the full value.
- `construction`: the context the model is built in. Under ZeRO-3 it is deepspeed.zero.Init, so each parameter is
  partitioned as soon as its module is constructed and no worker ever holds the whole model.
- `optimizer_args`: with offload, DeepSpeed's own AdamW (DeepSpeedCPUAdam, built at first use) from a config block
  over towerlab's parameter groups; otherwise torch AdamW.
- `export_fp32`: DeepSpeed's zero_to_fp32 over a run's last checkpoint (every rank's shard), logged to MLflow.

DeepSpeed is imported inside these functions only (workers set DS_ACCELERATOR first).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any

from towerlab.config import Recipe

PERSISTENCE_THRESHOLD = 100_000  # elements; DeepSpeed's default, stated so the logit scale's fate is explicit


def offloading(r: Recipe) -> bool:
    return r.train.offload_optimizer != "none" or r.train.offload_param != "none"


def _offload(device: str, r: Recipe) -> dict:
    block: dict[str, Any] = {"device": device, "pin_memory": bool(r.train.use_gpu)}
    if device == "nvme":
        block["nvme_path"] = r.train.nvme_path
    return block


def zero_section(r: Recipe) -> dict:
    t = r.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        # ZeRO 2/3 allocate a whole bucket up front: DeepSpeed's default 5e8 elements is 2 GiB in fp32 per worker
        zero["reduce_bucket_size"] = t.reduce_bucket_size
        if t.zero_stage < 3:
            zero["allgather_bucket_size"] = t.reduce_bucket_size
    if t.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD, "sub_group_size": t.sub_group_size,
                     # DeepSpeed's defaults (1e9 elements) let every gathered parameter stay live for reuse in the
                     # backward pass, up to the whole model per worker; bounded here like the buckets
                     "stage3_max_live_parameters": t.reduce_bucket_size,
                     "stage3_max_reuse_distance": t.reduce_bucket_size,
                     "stage3_prefetch_bucket_size": t.reduce_bucket_size,
                     # towerlab saves with engine.save_checkpoint (shards) and exports with zero_to_fp32
                     "stage3_gather_16bit_weights_on_model_save": False})
    if t.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(t.offload_optimizer, r)
    if t.offload_param != "none":
        zero["offload_param"] = _offload(t.offload_param, r)
    return zero


def aio_section(r: Recipe) -> dict | None:
    """DeepSpeed's async I/O settings for nvme offload (libaio; its op builds at first use)."""
    if "nvme" not in (r.train.offload_optimizer, r.train.offload_param):
        return None
    return {"block_size": 1 << 20, "queue_depth": 8, "single_submit": False, "overlap_events": True,
            "intra_op_parallelism": 1}


def construction(r: Recipe, ds_config: dict | None):
    """The context to build the model in: deepspeed.zero.Init under ZeRO-3, else nothing."""
    if r.train.zero_stage != 3 or ds_config is None:
        return contextlib.nullcontext()
    import deepspeed

    if "nvme" in (r.train.offload_optimizer, r.train.offload_param):
        os.makedirs(r.train.nvme_path, exist_ok=True)
    # zero.Init validates the batch sizes against deepspeed.comm's world size before it would initialise
    # deepspeed.comm itself: wrap the process group Ray Train (or the caller) created first
    deepspeed.init_distributed(dist_init_required=False)
    remote = r.train.offload_param if r.train.offload_param != "none" else None
    return deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote,
                               pin_memory=bool(r.train.use_gpu))


def optimizer_args(r: Recipe, module, total_steps: int, ds_config: dict) -> dict:
    """Keyword arguments for deepspeed.initialize: optimizer and LR schedule (same groups and schedule either way)."""
    from towerlab.train.optim import build_optimizer, lr_factor, param_groups

    import torch

    o = r.optim

    def schedule(opt):  # built by DeepSpeed on the optimizer it steps (ZeRO-3 regroups the parameters)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o, total_steps))

    if not offloading(r):
        optimizer, _ = build_optimizer(module, o, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": schedule}
    # offloaded optimizer state lives with DeepSpeed's CPU Adam (adam_w_mode: decoupled decay, as torch AdamW)
    ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                          "weight_decay": o.weight_decay}}
    return {"model_parameters": param_groups(module, o.weight_decay), "lr_scheduler": schedule}


def _loss_tensors(engine) -> list:
    m = engine.module
    return [p for p in (m.model.logit_scale, m.model.logit_bias, *m.loss_fn.parameters()) if p is not None]


def keep_loss_tensors_whole(engine) -> None:
    """Under ZeRO-3: the logit scale and bias (and a loss's own parameters) are read by the loss and the feature
    cache outside the model's forward, so they must never be partitioned between uses. They are small enough to be
    persistent; DeepSpeed still releases persistent parameters while it records its first trace, so they are also
    registered as external parameters of the train module (which exempts them from release) and gathered now."""
    params = [p for p in _loss_tensors(engine) if hasattr(p, "ds_id")]
    if not params:
        return
    import deepspeed

    if not all(p.ds_persist for p in params):
        raise RuntimeError("ZeRO-3 would partition the logit scale: keep stage3_param_persistence_threshold >= "
                           f"{max(p.ds_numel for p in params)}")
    for p in params:
        deepspeed.zero.register_external_parameter(engine.module, p)
        p.is_external_param = True  # the flag the release path checks (the public call above does not set it)
    missing = [p for p in params if p.ds_status.name != "AVAILABLE"]
    if missing:
        missing[0].all_gather(param_list=missing)


def share_master_weights(engine) -> None:
    """ZeRO-3 without optimizer offload, master weights in the parameters' own dtype (fp32 training): make each
    sub-group's optimizer master partition an alias of the parameter partition instead of a second copy.

    DeepSpeed means to alias them in that case (stage3.py: "those in fp32_partitioned_groups are aliases") but
    tests it by comparing a torch.device with the accelerator's device name, a str, which is never equal; so it
    clones, and every worker holds one more fp32 copy of its partition: 0.28 GiB of 2.6 GiB per worker for the
    151M-parameter model of benchmarks/zero_memory.py on 2 workers. The optimizer's state and parameter groups keep
    the same tensor objects; only their storage changes. Nothing to do once DeepSpeed aliases them itself."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() != 3 or not hasattr(opt, "fp32_partitioned_groups_flat") or \
            getattr(opt, "offload_optimizer", False):
        return
    for lp, master in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
        if lp is None or master.numel() == 0 or lp.dtype != master.dtype or lp.device != master.device \
                or lp.shape != master.shape or master.untyped_storage().data_ptr() == lp.untyped_storage().data_ptr():
            continue
        master.data = lp.data  # same values: DeepSpeed cloned the master from this partition at initialisation


def logit_scale_is_whole(engine) -> bool:
    p = engine.module.model.logit_scale
    return p.numel() == p.ds_numel if hasattr(p, "ds_id") else True


def _holds_elements(p) -> bool:
    """Under ZeRO-3, whether this rank's shard of `p` holds real elements: a 1-element parameter is padded to one
    element per rank, and DeepSpeed's set_full_hp_param fails on the ranks that hold only padding."""
    if not hasattr(p, "ds_id"):
        return True
    import deepspeed.comm as dist

    part = p.ds_tensor.ds_numel
    rank = dist.get_rank(group=p.ds_process_group)
    if rank * part < p.ds_numel < (rank + 1) * part:
        raise RuntimeError(f"cannot clamp a partly padded shard of a {p.ds_numel}-element parameter")
    return (rank + 1) * part <= p.ds_numel


def clamp_logit_scale(engine) -> None:
    """Clamp the logit scale after an optimizer step in the parameter the next forward reads AND in DeepSpeed's
    fp32 master copy (ZeRO 1-3 keep one; clamping only the parameter would be undone by the next step)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    model = engine.module.model
    p = model.logit_scale
    if p.requires_grad:
        master = safe_get_full_fp32_param(p)  # a collective under ZeRO-3: every rank calls it
        if master is not None and _holds_elements(p):
            safe_set_full_fp32_param(p, master.clamp(0.0, model.max_log_scale))
    with torch.no_grad():
        model.clamp_logit_scale()


def fix_logit_scale(engine, temperature: float) -> None:
    """Set a fixed (not learned) logit scale to 1/temperature: the recipe's, not the checkpoint's, since
    population-based training restarts a trial from another trial's checkpoint with a perturbed temperature. The
    scale is kept whole on every rank (see keep_loss_tensors_whole) and has no optimizer master copy."""
    import math

    import torch

    with torch.no_grad():
        engine.module.model.logit_scale.fill_(math.log(1.0 / temperature))


def export_fp32(checkpoint, tag: str, run) -> str:
    """Consolidate a ZeRO-2/3 checkpoint (every rank's shard) into one fp32 state dict with DeepSpeed's
    zero_to_fp32 and log it to `run` as the artifact model/pytorch_model_fp32.pt. Returns the artifact path."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with checkpoint.as_directory() as d:
        state = get_fp32_state_dict_from_zero_checkpoint(d, tag=tag)
    out = tempfile.mkdtemp(prefix="towerlab-fp32-")
    try:
        tmp = os.path.join(out, "pytorch_model_fp32.pt.tmp")
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, os.path.join(out, "pytorch_model_fp32.pt"))
        run.log_artifact(os.path.join(out, "pytorch_model_fp32.pt"), "model")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return "model/pytorch_model_fp32.pt"
