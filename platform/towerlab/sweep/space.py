"""Sweep file -> Ray Tune: the search space, the search algorithm and the scheduler."""

from __future__ import annotations

from towerlab.sweep.schema import SweepConfig


def param_space(sweep: SweepConfig) -> dict:
    from ray import tune

    grid_ok = sweep.search.algorithm == "grid"
    space = {}
    for key, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            space[key] = tune.grid_search(list(values)) if grid_ok else tune.choice(list(values))
        elif kind == "choice":
            space[key] = tune.choice(list(values))
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        else:
            space[key] = tune.loguniform(*values)
    return space


def search_algorithm(sweep: SweepConfig):
    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.search.seed)
    return None  # grid and random: Tune's variant generator (grid_search expands, distributions sample)


def scheduler(sweep: SweepConfig):
    """Schedulers count time in training steps (`step`, reported with every metric)."""
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.scheduler
    if s.name == "asha":
        # metric and mode come from the TuneConfig
        return ASHAScheduler(time_attr="step", grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    return None
