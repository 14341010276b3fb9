"""The whole DeepSpeed configuration a recipe implies, in one place: `deepspeed_config` (batch sizes, clipping,
precision, the zero_optimization block, async I/O) and `optimizer_args` (the optimizer and LR schedule handed to
deepspeed.initialize, or the optimizer block DeepSpeed builds itself when its state is offloaded).

- `zero_section`: the zero_optimization block (stage, ZeRO-3 persistence and sub-groups, optimizer/parameter
  offload to cpu or nvme). Parameters up to `PERSISTENCE_THRESHOLD` elements stay whole on every rank under ZeRO-3
  (DeepSpeed's stage3_param_persistence_threshold): the logit scale and bias (one element each) are therefore never
  partitioned, so the loss, which reads them outside the model's forward, always sees the full value.
- precision: fp32 on CPU (bf16 matmuls are slow there and DeepSpeed refuses fp16 on CPU), bf16 on GPU. DeepSpeed
  knows the accumulation count only to place its step boundary: the gradients of each micro-batch come from the
  feature cache (the whole global batch as negatives) and are already those of the full loss, so the train step
  calls engine.backward(..., scale_wrt_gas=False).

Plain dictionaries only: nothing here imports DeepSpeed, so the driver and the planner can use it.
"""

from __future__ import annotations

from typing import Any

from towerlab.config import BatchPlan, Recipe

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


def precision(r: Recipe) -> str:
    return ("bf16" if r.train.use_gpu else "fp32") if r.train.precision == "auto" else r.train.precision


def deepspeed_config(r: Recipe, plan: BatchPlan) -> dict:
    cfg: dict = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": r.optim.grad_clip,
        "zero_optimization": zero_section(r),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # towerlab logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if precision(r) == "bf16":
        cfg["bf16"] = {"enabled": True}
    if aio_section(r):
        cfg["aio"] = aio_section(r)
    return cfg


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
