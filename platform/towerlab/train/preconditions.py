"""What this machine must provide for the optional features a recipe turns on, checked on the driver before any
process starts, so a missing piece is one line naming the key and the fix instead of a traceback inside a Ray worker:

- nvme offload (train.offload_optimizer / train.offload_param = nvme): DeepSpeed's async_io op, which it builds at
  first use against libaio (Debian's libaio-dev: the shared library and its header);
- train.use_gpu=true: a GPU that torch can see;
- bf16 on a GPU (train.precision=bf16, or auto, which picks bf16 there): a GPU that supports it (Ampere or newer).

These facts are about the machine the workers run on, so they are checked for a local run only: with RAY_ADDRESS set
the workers run on the cluster's nodes, whose hardware and packages this machine cannot see. The recipe's own
consistency (keys, ranges, combinations) is checked when it is loaded (train/recipe.py), not here.
"""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path
from typing import Mapping

from towerlab.config import ConfigError, Recipe

HEADER_DIRS = ("/usr/include", "/usr/local/include")


def libaio_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why DeepSpeed's async_io op cannot be built here, or None. A cheap look (the shared library through the
    loader's cache, the header on the compiler's usual include paths): DeepSpeed's own AsyncIOBuilder.is_compatible()
    compiles a test program and imports DeepSpeed, tens of seconds on a busy machine."""
    env = os.environ if environ is None else environ
    if ctypes.util.find_library("aio") is None:
        return "libaio is not installed"
    extra = [d for var in ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH") for d in env.get(var, "").split(":") if d]
    if not any(Path(d, "libaio.h").is_file() for d in (*extra, *HEADER_DIRS)):
        return "libaio's header (libaio.h, from libaio-dev) is missing"
    return None


def check_preconditions(recipe: Recipe, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, in one line naming the key and the fix, an optional feature this machine cannot run."""
    env = os.environ if environ is None else environ
    if env.get("RAY_ADDRESS"):
        return  # the cluster's nodes run the workers: their hardware is not visible from here
    t = recipe.train
    nvme = [k for k in ("offload_optimizer", "offload_param") if getattr(t, k) == "nvme"]
    if nvme:
        problem = libaio_problem(env)
        if problem:
            raise ConfigError(f"train.{nvme[0]}=nvme needs DeepSpeed's async_io op, built against libaio: {problem} "
                              "here. Install it (apt-get install libaio-dev) or offload to cpu")
    if t.use_gpu:  # (bf16 without a GPU is refused when the recipe loads)
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.use_gpu=true but torch sees no GPU here (torch.cuda.is_available() is false): "
                              "set train.use_gpu=false, or run on a cluster with GPUs (RAY_ADDRESS, towerlab submit)")
        if t.precision in ("bf16", "auto") and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision={t.precision} means bf16 on a GPU, which "
                              f"{torch.cuda.get_device_name(0)} does not support: set train.precision=fp32")
