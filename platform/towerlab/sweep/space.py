"""Sweep file -> Ray Tune: the search space, the search algorithm and the scheduler."""

from __future__ import annotations

from towerlab.sweep.schema import SweepConfig

CONFIG_KEY = "configuration"  # in a replicated sweep's trial config: the configuration's {dotted key: value}
SEED_KEY = "seed"  # the recipe key a replicate varies


def domain(kind: str, values: list, grid_ok: bool, integer: bool = False):
    """Tune's domain of one space entry; `integer`: a range over an integer recipe key, sampled as integers with
    both bounds included (sweep/load.py allows only integer bounds there)."""
    from ray import tune

    if kind == "grid":
        return tune.grid_search(list(values)) if grid_ok else tune.choice(list(values))
    if kind == "choice":
        return tune.choice(list(values))
    if integer:  # Tune's upper bound is exclusive
        lo, hi = int(values[0]), int(values[1]) + 1
        return tune.randint(lo, hi) if kind == "uniform" else tune.lograndint(lo, hi)
    return tune.uniform(*values) if kind == "uniform" else tune.loguniform(*values)


def param_space(sweep: SweepConfig, int_keys: frozenset[str] | set[str] = frozenset()) -> dict:
    """`int_keys`: the searched recipe keys that take integers (sweep.load.trial_plan's)."""
    grid_ok = sweep.search.algorithm == "grid"
    return {key: domain(*next(iter(spec.items())), grid_ok, key in int_keys) for key, spec in sweep.space.items()}


def configurations(sweep: SweepConfig, int_keys: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """The sweep's configurations, each drawn once (grid: every combination of grid values, `num_samples` times, with
    the ranges sampled; random: `num_samples` draws), seeded by search.seed. Replicates need them drawn before Tune:
    Tune's own variant generator draws a range's value anew for every grid entry, so seeds of one configuration
    would train different values."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(sweep.search.seed % 2**32)
    space = param_space(sweep, int_keys)
    return [dict(config) for _ in range(sweep.search.num_samples) for _, config in generate_variants(space,
                                                                                                  random_state=rng)]


def replicated_space(configs: list[dict], seeds: list[int]) -> dict:
    """Every configuration once with every seed: a grid over both (see `trial_config` for what a trial reads)."""
    from ray import tune

    return {CONFIG_KEY: tune.grid_search(configs), SEED_KEY: tune.grid_search(seeds)}


def trial_config(config: dict) -> dict:
    """A trial's recipe overrides as {dotted key: value}, whether its sweep is replicated or not."""
    return {**config.get(CONFIG_KEY, {}), **{k: v for k, v in config.items() if k != CONFIG_KEY}}


def search_algorithm(sweep: SweepConfig):
    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.search.seed)
    return None  # grid and random: Tune's variant generator (grid_search expands, distributions sample)


def scheduler(sweep: SweepConfig, max_t: int | None = None):
    """Schedulers count time in training steps or samples seen (`step` and `samples`, reported with every metric;
    scheduler.time chooses). `max_t`: the most a trial trains in that unit (ASHA gets one more; without it Tune's
    default, 100, would cut longer trials short)."""
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    from towerlab.sweep.load import PBT_KEY

    s = sweep.scheduler
    # metric and mode come from the TuneConfig
    if s.name == "asha":
        # one past the budget: ASHA stops a trial whose step reaches max_t, and a trial stopped by the scheduler
        # is recorded KILLED; at max_t + 1 a trial that trains all its steps ends FINISHED
        extra = {} if max_t is None else {"max_t": max_t + 1}
        return ASHAScheduler(time_attr=time_attr(sweep), grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor,
                             **extra)
    if s.name == "pbt":
        kind, values = next(iter(sweep.space[PBT_KEY].items()))
        # a grid's values are the initial population; perturbations may then move anywhere between its extremes
        if kind == "grid":
            kind, values = ("loguniform", [min(values), max(values)]) if min(values) < max(values) else ("choice", values)
        mutation = domain(kind, values, False)
        return PopulationBasedTraining(
            time_attr=time_attr(sweep), perturbation_interval=s.perturbation_interval,
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability, hyperparam_mutations={PBT_KEY: mutation}, synch=s.synch)
    return None


def time_attr(sweep: SweepConfig) -> str:
    """The reported number a scheduler counts time in (train/loop.py reports both with every metric)."""
    return "samples" if sweep.scheduler.time == "samples" else "step"
