"""Loading and validating a sweep file before anything starts (no Ray, no MLflow): the schema, the recipe it names,
every searched key (by loading the recipe with each searched value, both bounds of a range), integer keys searched
over integer ranges only, data that gives every trial's loss its positives, the metric among those every trial
logs, and the scheduler settings Ray Tune would assert on or never act on."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from towerlab.config import ConfigError, Recipe, load_structured
from towerlab.config.checks import check_name, check_ranges
from towerlab.sweep.schema import DISTRIBUTIONS, RANGES, SweepConfig
from towerlab.train.dataset import check_positives, peek_positives
from towerlab.train.metrics import logged_metrics
from towerlab.train.recipe import load_recipe
from towerlab.util import did_you_mean

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
        if kind in RANGES and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                      for v in values):
            raise ConfigError(f"{src}: space.{key}.{kind}={list(values)}: the bounds must be finite numbers")
        if kind in RANGES and (len(values) != 2 or not values[0] < values[1]):
            raise ConfigError(f"{src}: space.{key}.{kind}: expected [low, high] with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{src}: space.{key}.loguniform: bounds must be > 0")
        if kind == "grid" and sweep.search.algorithm == "optuna":
            raise ConfigError(f"{src}: space.{key}: optuna cannot search a grid; use choice")
    plan = trial_plan(sweep, path)
    for where, recipe in plan.recipes:
        facts = peek_positives(recipe)  # a loss that needs labels, on data without them: refused before Ray
        if facts is not None:
            try:
                check_positives(recipe, *facts)
            except ConfigError as e:
                raise ConfigError(f"{src}: {where}: {e}") from None
    check_metric(sweep, src, plan)
    if sweep.scheduler.name == "pbt":
        check_pbt(sweep, src, plan.base)
    check_scheduler(sweep, src, plan)
    return sweep


@dataclass(frozen=True)
class TrialPlan:
    """What the trials' recipes say, read before anything starts: the base recipe (sweep overrides applied) and one
    recipe per searched value (grid and choice values, both bounds of a range), each with what it differs by (every
    trial trains one of these values of each key, so what all of them have every trial has); the fewest and most
    training steps of a trial; the searched keys that take integers."""

    base: Recipe
    recipes: list[tuple[str, Recipe]]  # ("space.KEY=VALUE", the recipe with that value): what trials train
    min_steps: int
    max_steps: int
    int_keys: frozenset[str]
    min_samples: int = 0
    max_samples: int = 0

    def extent(self, sweep: SweepConfig) -> tuple[int, int]:
        """The shortest and longest trial in the unit the scheduler counts (scheduler.time: steps or samples)."""
        if sweep.scheduler.time == "samples":
            return self.min_samples, self.max_samples
        return self.min_steps, self.max_steps


def trial_plan(sweep: SweepConfig, sweep_file: str | os.PathLike) -> TrialPlan:
    """Load the trials' recipe once with the sweep's overrides and once per searched value, so every searched key
    exists with a valid value (a ConfigError naming the sweep file and the value otherwise), and ranges over
    integer keys have integer bounds (they are then sampled as integers: sweep/space.py)."""
    src, file = str(sweep_file), recipe_path(sweep, sweep_file)
    base = [*sweep.overrides, f"train.workers={sweep.workers_per_trial}"]
    try:
        base_recipe = load_recipe(file, base)
    except ConfigError as e:
        raise ConfigError(f"{src}: overrides: {e}") from None
    recipes, int_keys = [], set()
    for key, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        if kind in RANGES and key_type(base_recipe, key) is int:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{src}: space.{key}.{kind}={list(values)}: {key} takes integers, so this range "
                                  "would give every trial a fraction: give integer bounds (then sampled as "
                                  f"integers), or a choice of integers, e.g. {key}: {{choice: [a, b]}}")
            int_keys.add(key)
        for v in values:  # grid and choice: every value; a range: both bounds
            try:
                recipes.append((f"space.{key}={v}", load_recipe(file, [*base, f"{key}={v}"])))
            except ConfigError as e:
                raise ConfigError(f"{src}: space.{key}={v}: {e}") from None
    steps = [r.train.steps for _, r in recipes]
    samples = [r.train.steps * r.data.global_batch for _, r in recipes]
    return TrialPlan(base_recipe, recipes, min(steps), max(steps), frozenset(int_keys), min(samples), max(samples))


def key_type(recipe: Recipe, key: str) -> Any:
    """The declared type of dotted recipe key `key` (Optional[X] as X), None when it is not a dataclass field."""
    *parents, leaf = key.split(".")
    obj: Any = recipe
    for part in parents:
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    if not dataclasses.is_dataclass(obj):
        return None
    hint = typing.get_type_hints(type(obj)).get(leaf)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # Optional[X] and X | None
    return args[0] if union and len(args) == 1 else hint


def check_metric(sweep: SweepConfig, src: str, plan: TrialPlan) -> None:
    """The sweep's metric is one every trial reports: else ASHA and PBT never see it and no best is found."""
    name = Path(sweep.recipe).name
    for where, recipe in plan.recipes:
        logged = logged_metrics(recipe)
        if sweep.metric in logged:
            continue
        # named only when the key matters: a metric no trial logs is not about one searched value
        when = f" when {where}" if any(sweep.metric in logged_metrics(r) for _, r in plan.recipes) else ""
        hint = did_you_mean(sweep.metric, logged).strip()
        raise ConfigError(f"{src}: metric={sweep.metric} is not logged by recipe {name}{when}: it logs "
                          f"{', '.join(logged)}{f' ({hint})' if hint else ''}")


def check_scheduler(sweep: SweepConfig, src: str, plan: TrialPlan) -> None:
    """What Ray Tune's schedulers would assert on or never act on, given the trials' training steps (Tune counts
    time in reported steps: sweep/space.py passes the most steps of a trial as ASHA's max_t)."""
    s, unit = sweep.scheduler, sweep.scheduler.time
    shortest, longest = plan.extent(sweep)
    if sweep.search.seeds > 1 and s.name == "pbt":
        raise ConfigError(f"{src}: search.seeds={sweep.search.seeds} with scheduler pbt: PBT hands one trial's "
                          "weights to another, so its replicates would not be independent: use scheduler.name=asha "
                          "or none, or search.seeds=1")
    if sweep.search.seeds > 1 and sweep.search.algorithm == "optuna":
        raise ConfigError(f"{src}: search.seeds={sweep.search.seeds} with search.algorithm=optuna: optuna picks each "
                          "configuration from the last results, so none is known in advance to replicate: use "
                          "algorithm grid or random, or search.seeds=1 (then replicate the best with a grid sweep)")
    if s.name == "asha" and s.grace_period >= longest:
        raise ConfigError(f"{src}: scheduler.grace_period={s.grace_period}: no trial trains more than {longest} "
                          f"{unit}, so ASHA could never stop one: use a grace_period below {longest} (e.g. "
                          f"{max(1, longest // 4)}), or scheduler.name=none")
    if s.name == "pbt":
        if sweep.search.algorithm == "optuna":
            raise ConfigError(f"{src}: scheduler pbt chooses the trials' temperatures itself and Ray Tune refuses it "
                              "with a search algorithm: use search.algorithm=grid or random")
        if s.perturbation_interval >= shortest:
            raise ConfigError(f"{src}: scheduler.perturbation_interval={s.perturbation_interval}: trials of "
                              f"{shortest} {unit} end before the first perturbation: use an interval "
                              f"below {shortest}, or scheduler.name=none")
        population = sweep.search.num_samples
        if sweep.search.algorithm == "grid":
            population *= math.prod(len(v) for spec in sweep.space.values() for k, v in spec.items() if k == "grid")
        if population < 2:
            raise ConfigError(f"{src}: scheduler pbt hands checkpoints from better trials to worse ones, but this "
                              f"sweep has {population} trial: raise search.num_samples or give a grid of "
                              f"{PBT_KEY} values")


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
