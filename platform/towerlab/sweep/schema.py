"""Typed schema of a sweep file: which recipe (with overrides), the search space over dotted recipe keys, the search
algorithm, the scheduler, the metric, and the budget. Loaded and validated like a recipe, before anything starts.

Search space entries, one key each:
    loss.name:             {grid: [clip, siglip, dcl]}       every value, in every combination with other grids
    loss.temperature_init: {choice: [0.03, 0.07]}            sampled
    optim.lr:              {loguniform: [1.0e-4, 1.0e-2]}    sampled
    optim.weight_decay:    {uniform: [0.0, 0.3]}             sampled
    train.steps:           {uniform: [100, 400]}             sampled as integers (an integer key: integer bounds)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from towerlab.config.checks import INT64_MAX, num
from towerlab.config.schema import Mode, TrackingConfig

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
RANGES = ("uniform", "loguniform")  # [low, high]; over an integer key both bounds are integers, sampled as integers


# Fixed sets of values as Enums (OmegaConf refuses anything else at load; member names equal values).
class Algorithm(StrEnum):
    grid = "grid"  # grid and choice entries in every combination, random samples of the rest
    random = "random"
    optuna = "optuna"


class TimeAxis(StrEnum):
    steps = "steps"
    samples = "samples"


class Scheduler(StrEnum):
    none = "none"
    asha = "asha"
    pbt = "pbt"


@dataclass
class SearchConfig:
    """How trials are chosen from the search space."""

    algorithm: Algorithm = Algorithm.grid
    """Search algorithm: grid (every grid/choice combination, random samples of the rest), random, or optuna."""
    num_samples: int = num(1, ge=1)
    """Repeats of the grid (grid) or number of trials (random, optuna), at least 1."""
    seed: int = num(0, ge=0, le=INT64_MAX)
    """Seed of the sampled values, in [0, 2**63 - 1]."""
    seeds: int = num(1, ge=1, le=100)
    """Replicates: every configuration trains this many times, with recipe seeds seed, seed+1, ... (initial weights
    and data order), in [1, 100]; `towerlab compare` turns them into a mean and an interval per configuration."""


@dataclass
class SchedulerConfig:
    """Early stopping (ASHA) or population-based training of the temperature (PBT)."""

    name: Scheduler = Scheduler.none
    """Trial scheduler: none (every trial runs to the end), asha (early stopping) or pbt (population-based training)."""
    time: TimeAxis = TimeAxis.steps
    """What the scheduler counts (grace_period, perturbation_interval): steps, or samples seen (a batch-size axis then
    compares trials at equal data)."""
    grace_period: int = num(10, ge=1)
    """asha: steps (or samples, with time=samples) before a trial can be stopped, at least 1."""
    reduction_factor: float = num(3.0, gt=1)
    """asha: each rung keeps the best 1/reduction_factor of the trials, > 1."""
    # pbt (population-based training of the temperature): every perturbation_interval steps a trial in the bottom
    # quantile_fraction takes over the latest checkpoint of one in the top and continues with a perturbed
    # loss.temperature_init (x0.8 or x1.2, or resampled from its space entry with resample_probability). Needs a fixed
    # temperature (loss.learn_temperature=false), and a checkpoint at least every perturbation_interval steps.
    perturbation_interval: int = num(10, ge=1)
    """pbt: training steps (or samples, with time=samples) between perturbations, at least 1 (and at least
    train.checkpoint_every)."""
    quantile_fraction: float = num(0.25, gt=0, le=0.5)
    """pbt: fraction of trials at the bottom that take over a checkpoint from the top, in (0, 0.5]."""
    resample_probability: float = num(0.25, ge=0, le=1)
    """pbt: probability that a perturbation resamples the temperature from its space entry instead of scaling it, in [0,
    1]."""
    # pbt: off, a trial compares with whatever the others last reported, so one that is slow to start can be handed
    # a checkpoint from a trial that has already finished, and has nothing left to train
    synch: bool = False
    """pbt: wait at every interval until all running trials reach it, then compare (Tune's synchronous PBT)."""


@dataclass
class SweepConfig:
    """A sweep file: the recipe, the search space over its keys, the search, the scheduler and the budget."""

    name: str = "sweep"
    """Sweep name, non-empty without '/': `towerlab sweep --resume NAME` continues it."""
    recipe: str = ""
    """Recipe file the trials train, relative to the sweep file (required)."""
    overrides: list[str] = field(default_factory=list)
    """Recipe overrides (key.path=value) applied to every trial."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: dotted recipe key -> one of {grid: [...]}, {choice: [...]}, {uniform: [low, high]}, {loguniform:
    [low, high]}."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """How trials are chosen."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Early stopping or population-based training."""
    metric: str = "eval/zeroshot/top1"
    """The metric trials are compared by, as logged (e.g. eval/NAME/METRIC or train/loss)."""
    mode: Mode = Mode.max
    """Whether a larger (max) or smaller (min) metric is better."""
    max_concurrent_trials: int = num(1, ge=1)
    """Trials running at once, at least 1."""
    workers_per_trial: int = num(2, ge=1)
    """Ray Train workers of each trial (its train.workers), at least 1."""
    storage_path: str = "results"
    """Directory or URI where <storage_path>/<name>/ holds Tune's state and, below it, the trials' checkpoints."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking of the parent run and the trials' child runs."""
    max_failures_per_trial: int = num(0, ge=-1)
    """Restarts of a trial's Ray Train run after a worker failure, at least 0; -1 retries without limit."""
