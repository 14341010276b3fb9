"""Replicates (search.seeds) and compute-matched budgets (train.samples, scheduler.time=samples): what the sweep
hands Ray Tune, checked without running it."""

import pytest
from ray.tune.search.variant_generator import generate_variants

from towerlab.config import ConfigError
from towerlab.sweep.load import load_sweep, trial_plan
from towerlab.sweep.run import _search_space
from towerlab.sweep.space import SEED_KEY, configurations, scheduler, trial_config
from towerlab.train.recipe import load_recipe


def _write(tmp_path, repo_root, body: str):
    p = tmp_path / "s.yaml"
    p.write_text(f"recipe: {repo_root}/recipes/debug.yaml\n" + body)
    return p


def _trials(space: dict) -> list[dict]:
    """The trial configs Tune's variant generator makes of `space` (what the trials receive)."""
    return [trial_config(config) for _, config in generate_variants(space)]


def test_every_configuration_trains_every_seed_with_the_same_values(tmp_path, repo_root):
    # a range sampled under a grid: Tune alone would draw it anew for every seed
    p = _write(tmp_path, repo_root, "space: {loss.name: {grid: [clip, siglip]}, "
                                    "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}\n"
                                    "search: {seeds: 3}\noverrides: [seed=7]\n")
    s = load_sweep(p)
    trials = _trials(_search_space(s, trial_plan(s, p)))
    assert len(trials) == 6
    by_config = {}
    for t in trials:
        by_config.setdefault((t["loss.name"], t["optim.lr"]), []).append(t[SEED_KEY])
    # two configurations (one lr drawn per loss), each with the recipe's seed and the next two
    assert len(by_config) == 2 and all(sorted(v) == [7, 8, 9] for v in by_config.values())
    assert configurations(s, trial_plan(s, p).int_keys) == configurations(s, trial_plan(s, p).int_keys)  # seeded


def test_one_seed_keeps_tunes_own_space(tmp_path, repo_root):
    p = _write(tmp_path, repo_root, "space: {loss.name: {grid: [clip, siglip]}}\n")
    s = load_sweep(p)
    trials = _trials(_search_space(s, trial_plan(s, p)))
    assert trials == [{"loss.name": "clip"}, {"loss.name": "siglip"}]


@pytest.mark.parametrize("body,expected", [
    ("space: {loss.temperature_init: {grid: [0.05, 0.1]}}\nsearch: {seeds: 2}\n"
     "overrides: [loss.learn_temperature=false, train.checkpoint_every=5]\n"
     "scheduler: {name: pbt, perturbation_interval: 5}\n", "search.seeds=2 with scheduler pbt"),
    ("space: {optim.lr: {choice: [0.1, 0.01]}}\nsearch: {seeds: 2, algorithm: optuna}\n",
     "search.seeds=2 with search.algorithm=optuna"),
    ("space: {optim.lr: {choice: [0.1]}}\nsearch: {seeds: 0}\n", "search.seeds"),
    ("space: {data.global_batch: {grid: [8, 16]}}\noverrides: [train.samples=160]\n"
     "scheduler: {name: asha, time: samples, grace_period: 160}\n",
     "grace_period=160: no trial trains more than 160 samples"),
])
def test_bad_replicate_and_budget_settings_are_one_line(tmp_path, repo_root, body, expected):
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, repo_root, body))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_samples_budget_sets_the_steps_per_batch_size(repo_root):
    small = load_recipe(repo_root / "recipes" / "debug.yaml", ["train.samples=1000", "data.global_batch=32"])
    large = load_recipe(repo_root / "recipes" / "debug.yaml", ["train.samples=1000", "data.global_batch=128"])
    assert (small.train.steps, large.train.steps) == (32, 8)  # ceil: every run sees at least the budget
    assert (small.train.samples, large.train.samples) == (1000, 1000)  # both recorded
    plain = load_recipe(repo_root / "recipes" / "debug.yaml", ["train.steps=12"])
    assert plain.train.steps == 12 and plain.train.samples is None


def test_asha_counts_samples_when_asked(tmp_path, repo_root):
    p = _write(tmp_path, repo_root, "space: {data.global_batch: {grid: [8, 32]}}\noverrides: [train.samples=640]\n"
                                    "scheduler: {name: asha, time: samples, grace_period: 160}\n")
    s = load_sweep(p)
    plan = trial_plan(s, p)
    assert plan.extent(s) == (640, 640)  # equal data whatever the batch
    asha = scheduler(s, plan.extent(s)[1])
    assert asha._time_attr == "samples" and asha._max_t == 641
