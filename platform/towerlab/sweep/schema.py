"""Typed schema of a sweep file: which recipe (with overrides), the search space over dotted recipe keys, the search
algorithm, the scheduler, the metric, and the budget. Loaded and validated like a recipe, before anything starts.

Search space entries, one key each:
    loss.name:             {grid: [clip, siglip, dcl]}       every value, in every combination with other grids
    loss.temperature_init: {choice: [0.03, 0.07]}            sampled
    optim.lr:              {loguniform: [1.0e-4, 1.0e-2]}    sampled
    optim.weight_decay:    {uniform: [0.0, 0.3]}             sampled
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from towerlab.config.schema import TrackingConfig

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


# Fixed sets of values as Enums (OmegaConf refuses anything else at load; member names equal values).
class Algorithm(StrEnum):
    grid = "grid"  # grid and choice entries in every combination, random samples of the rest
    random = "random"
    optuna = "optuna"


class Scheduler(StrEnum):
    none = "none"
    asha = "asha"
    pbt = "pbt"


class Mode(StrEnum):
    max = "max"
    min = "min"


@dataclass
class SearchConfig:
    algorithm: Algorithm = Algorithm.grid  # grid (grid and choice entries, random samples of the rest) | random | optuna
    num_samples: int = 1  # repeats of the grid (grid) or number of trials (random, optuna)
    seed: int = 0


@dataclass
class SchedulerConfig:
    name: Scheduler = Scheduler.none  # none | asha | pbt
    grace_period: int = 10  # asha: steps before a trial can be stopped
    reduction_factor: float = 3.0  # asha: keep the best 1/reduction_factor at every rung
    # pbt (population-based training of the temperature): every perturbation_interval steps a trial in the bottom
    # quantile_fraction takes over the latest checkpoint of one in the top and continues with a perturbed
    # loss.temperature_init (x0.8 or x1.2, or resampled from its space entry with resample_probability). Needs a fixed
    # temperature (loss.learn_temperature=false), and a checkpoint at least every perturbation_interval steps.
    perturbation_interval: int = 10
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    # pbt: wait at every interval until all running trials reach it, then compare (Tune's synchronous PBT). Off, a
    # trial compares with whatever the others last reported, so one that is slow to start can be handed a checkpoint
    # from a trial that has already finished, and has nothing left to train
    synch: bool = False


@dataclass
class SweepConfig:
    name: str = "sweep"  # sweep name: `towerlab sweep --resume NAME` continues it
    recipe: str = ""  # recipe file, relative to the sweep file
    overrides: list[str] = field(default_factory=list)  # applied to the recipe for every trial
    space: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metric: str = "eval/zeroshot/top1"
    mode: Mode = Mode.max  # max | min
    max_concurrent_trials: int = 1
    workers_per_trial: int = 2
    storage_path: str = "results"  # <storage_path>/<name>/ holds Tune's state; trials' checkpoints below it
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    max_failures_per_trial: int = 0
