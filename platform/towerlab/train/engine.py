"""The DeepSpeed configuration a recipe implies.

fp32 on CPU (bf16 matmuls are slow there and DeepSpeed refuses fp16 on CPU), bf16 on GPU. DeepSpeed knows the
accumulation count only to place its step boundary: the gradients of each micro-batch come from the feature cache
(the whole global batch as negatives) and are already those of the full loss, so the train step calls
engine.backward(..., scale_wrt_gas=False).
"""

from __future__ import annotations

from towerlab.config import BatchPlan, Recipe
from towerlab.train.zero import aio_section, zero_section


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
