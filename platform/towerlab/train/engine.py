"""The DeepSpeed engine as every towerlab worker builds it (`initialize_engine`) and the ZeRO-3 fix-ups around it:
the context the model is built in (deepspeed.zero.Init under ZeRO-3, so no worker ever holds the whole model), the
loss's tensors kept whole, the optimizer's master weights aliased, the logit scale clamped in the parameter and in
DeepSpeed's fp32 master copy.

DeepSpeed is imported inside these functions only (workers set DS_ACCELERATOR first), through `lean_deepspeed`.
"""

from __future__ import annotations

import contextlib
import os

from towerlab.config import Recipe


def construction(r: Recipe, ds_config: dict | None):
    """The context to build the model in: deepspeed.zero.Init under ZeRO-3, else nothing."""
    if r.train.zero_stage != 3 or ds_config is None:
        return contextlib.nullcontext()
    deepspeed = lean_deepspeed()

    if "nvme" in (r.train.offload_optimizer, r.train.offload_param):
        os.makedirs(r.train.nvme_path, exist_ok=True)
    # zero.Init validates the batch sizes against deepspeed.comm's world size before it would initialise
    # deepspeed.comm itself: wrap the process group Ray Train (or the caller) created first
    deepspeed.init_distributed(dist_init_required=False)
    remote = r.train.offload_param if r.train.offload_param != "none" else None
    return deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote,
                               pin_memory=bool(r.train.use_gpu))


def initialize_engine(r: Recipe, module, ds_config: dict, total_steps: int):
    """deepspeed.initialize as every towerlab worker calls it, and what must follow it: the loss's tensors kept
    whole under ZeRO-3, the optimizer's master weights aliased where DeepSpeed copies them needlessly. Returns (engine, optimizer, lr_scheduler)."""
    from towerlab.train.deepspeed_config import optimizer_args

    deepspeed = lean_deepspeed()

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, config=ds_config, dist_init_required=False,
        **optimizer_args(r, module, total_steps, ds_config))
    keep_loss_tensors_whole(engine)
    share_master_weights(engine)
    return engine, optimizer, scheduler


def lean_deepspeed():
    """`import deepspeed`, kept from building its shared-memory all-reduce kernel on CPU workers.

    DeepSpeed's TorchBackend loads `deepspeed_shm_comm` when it is set up: a C++ extension that ninja compiles into
    the torch extensions cache on first use, and again whenever the cache was built from another virtualenv (the
    build line names the path); before that, it probes every op's compatibility with the compiler. The kernel
    serves only `inference_all_reduce`, which training never calls (gradients go through torch.distributed), so
    the probe, the compile and the load were start-up cost only (about a minute of compile on 2 cores after a fresh
    install), and the kernel's 69 MB /dev/shm buffer per rank was never unlinked. `deepspeed.ops.__compatible_ops__`
    is where DeepSpeed caches the probe's answer, computed on first access; an answer set before then is used as
    is, and an op it does not list counts as not compatible. Every worker imports DeepSpeed through here."""
    import deepspeed
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}
    return deepspeed


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
