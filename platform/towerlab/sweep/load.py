"""Loading and validating a sweep file before anything starts: the schema, the recipe it names, every searched key
(by loading the recipe with a sample value of each), the metric, mode, algorithm and scheduler names."""

from __future__ import annotations

import os
from pathlib import Path

from towerlab.config import ConfigError, load_structured
from towerlab.config.checks import check_name, check_ranges
from towerlab.sweep.schema import DISTRIBUTIONS, SweepConfig
from towerlab.train.recipe import load_recipe

PBT_KEY = "loss.temperature_init"  # what population-based training perturbs


def recipe_path(sweep: SweepConfig, sweep_file: str | os.PathLike) -> Path:
    return (Path(sweep_file).parent / sweep.recipe).resolve()



def load_sweep(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> SweepConfig:
    sweep: SweepConfig = load_structured(SweepConfig, path, overrides)
    src = str(path)
    try:
        check_ranges(sweep, "")
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    if not sweep.recipe:
        raise ConfigError(f"{src}: 'recipe' is required: the recipe file the trials train, relative to the sweep")
    if not recipe_path(sweep, path).is_file():
        raise ConfigError(f"{src}: recipe '{sweep.recipe}' not found (looked at {recipe_path(sweep, path)})")
    if not sweep.space:
        raise ConfigError(f"{src}: 'space' is empty: give at least one key, e.g. loss.temperature_init: "
                          "{choice: [0.03, 0.07]}")
    try:
        check_name(sweep.name, "sweep")
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    for key, spec in sweep.space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{src}: space.{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, "
                              f"e.g. {key}: {{choice: [a, b]}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{src}: space.{key}.{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform") and (len(values) != 2 or not values[0] < values[1]):
            raise ConfigError(f"{src}: space.{key}.{kind}: expected [low, high] with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{src}: space.{key}.loguniform: bounds must be > 0")
        if kind == "grid" and sweep.search.algorithm == "optuna":
            raise ConfigError(f"{src}: space.{key}: optuna cannot search a grid; use choice")
    # every searched key must exist in the recipe, with a valid type: load it once per key's sample values
    base = [*sweep.overrides, f"train.workers={sweep.workers_per_trial}"]
    for key, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        # a range is sampled as floats (Tune's uniform and loguniform): try one that is not a whole number, so an
        # integer key searched by a range fails here, not in every trial
        for v in values if kind in ("grid", "choice") else [values[0] + (values[1] - values[0]) * 0.37]:
            try:
                load_recipe(recipe_path(sweep, path), [*base, f"{key}={v}"])
            except ConfigError as e:
                raise ConfigError(f"{src}: space.{key}={v}: {e}") from None
    check_metric(sweep, src, load_recipe(recipe_path(sweep, path), base))
    if sweep.scheduler.name == "asha":
        steps = load_recipe(recipe_path(sweep, path), base).train.steps
        if sweep.scheduler.grace_period > steps:
            raise ConfigError(f"{src}: scheduler.grace_period={sweep.scheduler.grace_period} > train.steps={steps}: "
                              "ASHA would never stop a trial; give a grace_period of at most the trials' steps")
    if sweep.scheduler.name == "pbt":
        check_pbt(sweep, src, load_recipe(recipe_path(sweep, path), base))
    return sweep


def check_metric(sweep: SweepConfig, src: str, recipe) -> None:
    """The metric must be one the trials log: train/... (the loop's), or eval/NAME/... of an evaluator of the recipe
    (else ASHA never stops a trial and no best is reported)."""
    m = sweep.metric
    evals = sorted(recipe.evals)
    if m.startswith("eval/"):
        name = m.split("/")[1] if m.count("/") >= 2 else ""
        if name not in recipe.evals:
            raise ConfigError(f"{src}: metric={m!r}: the recipe has no evaluator '{name}' (its evaluators: "
                              f"{', '.join(evals) or 'none'}); give eval/NAME/METRIC of one of them, or train/loss")
    elif not m.startswith(("train/", "data/")):
        raise ConfigError(f"{src}: metric={m!r}: the trials log train/... and eval/NAME/... metrics, e.g. "
                          f"train/loss or eval/{evals[0] if evals else 'zeroshot'}/top1")


def check_pbt(sweep: SweepConfig, src: str, recipe) -> None:
    """PBT restarts a trial from another's checkpoint with a perturbed temperature: the temperature must be a fixed
    hyperparameter (a learned one is restored from the checkpoint) and checkpoints must come at least as often."""
    s = sweep.scheduler
    if PBT_KEY not in sweep.space:
        raise ConfigError(f"{src}: scheduler pbt perturbs {PBT_KEY}: add it to space, e.g. "
                          f"{PBT_KEY}: {{loguniform: [0.01, 1.0]}}")
    if recipe.loss.learn_temperature:
        raise ConfigError(f"{src}: scheduler pbt perturbs {PBT_KEY}, but the recipe learns the temperature (it would "
                          "be restored from the checkpoint): add loss.learn_temperature=false to overrides")
    if recipe.train.checkpoint_every > s.perturbation_interval:
        raise ConfigError(f"{src}: scheduler pbt: train.checkpoint_every={recipe.train.checkpoint_every} > "
                          f"perturbation_interval={s.perturbation_interval}: a trial would have no checkpoint to "
                          f"hand over; add train.checkpoint_every={s.perturbation_interval} to overrides")
