from pathlib import Path

import pytest

from ray.tune.search.variant_generator import generate_variants

from towerlab.config import ConfigError
from towerlab.sweep.load import load_sweep, trial_plan
from towerlab.sweep.run import _search_space
from towerlab.train.recipe import load_recipe
from towerlab.sweep.space import SEED_KEY, configurations, param_space, scheduler, trial_config


def _write(tmp_path, repo_root, body: str):
    p = tmp_path / "s.yaml"
    p.write_text(f"recipe: {repo_root}/recipes/debug.yaml\n" + body)
    return p


def test_quickstart_loads_and_maps_to_tune(repo_root):
    s = load_sweep(repo_root / "sweeps" / "quickstart.yaml")
    assert s.scheduler.name == "asha" and s.metric == "eval/zeroshot/top1"
    space = param_space(s)
    assert space["loss.name"] == {"grid_search": ["clip", "siglip", "dcl"]}
    assert scheduler(s).__class__.__name__ == "AsyncHyperBandScheduler"


def test_random_turns_grids_into_choices(tmp_path, repo_root):
    s = load_sweep(_write(tmp_path, repo_root, "space: {loss.name: {grid: [clip, siglip]}, optim.lr: "
                                               "{loguniform: [1.0e-4, 1.0e-2]}}\nsearch: {algorithm: random}\n"))
    space = param_space(s)
    assert type(space["loss.name"]).__name__ == "Categorical" and type(space["optim.lr"]).__name__ == "Float"


@pytest.mark.parametrize("body, expected", [
    ("space: {optim.lrr: {choice: [0.1]}}\n", "space.optim.lrr=0.1"),
    ("space: {optim.lr: {choice: [fast]}}\n", "wrong type for 'optim.lr'"),
    ("space: {loss.name: {grid: [clip, sigclip]}}\n", "unknown loss 'sigclip'"),
    ("space: {optim.lr: {normal: [0, 1]}}\n", "give exactly one of grid, choice, uniform, loguniform"),
    ("space: {optim.lr: {uniform: [1, 0]}}\n", "low < high"),
    ("space: {optim.lr: {choice: [0.1]}}\nmode: maximum\n", "mode='maximum'"),
    ("space: {optim.lr: {choice: [0.1]}}\nscheduler: {name: hyperband}\n", "scheduler.name='hyperband'"),
    ("space: {}\n", "'space' is empty"),
    ("space: {optim.lr: {choice: [0.1]}}\nsearch: {num_samples: 0}\n", "search.num_samples=0: must be at least 1"),
    ("space: {optim.lr: {choice: [0.1]}}\nscheduler: {name: asha, reduction_factor: 1}\n",
     "scheduler.reduction_factor=1: must be > 1"),
    ("space: {optim.lr: {choice: [0.1]}}\nscheduler: {quantile_fraction: 0.9}\n",
     "scheduler.quantile_fraction=0.9: must be in (0, 0.5]"),
    ("space: {optim.lr: {choice: [0.1]}}\nsearch: {algorithm: bayes}\n",
     "search.algorithm='bayes' is not allowed. Use one of: grid, random, optuna"),
    ("space: {optim.lr: {choice: [0.1]}}\nmetrc: x\n", "Did you mean 'metric'?"),
    ("space: {optim.lr: {choice: [0.1]}}\nscheduler: {name: pbt}\n", "add it to space"),
    ("space: {loss.temperature_init: {grid: [0.05, 0.5]}}\nscheduler: {name: pbt}\n",
     "add loss.learn_temperature=false"),
    ("overrides: [loss.learn_temperature=false, train.checkpoint_every=50]\n"
     "space: {loss.temperature_init: {grid: [0.05, 0.5]}}\nscheduler: {name: pbt, perturbation_interval: 10}\n",
     "add train.checkpoint_every=10"),
])
def test_bad_sweeps_are_one_line(tmp_path, repo_root, body, expected):
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, repo_root, body))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_missing_recipe(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("recipe: nowhere.yaml\nspace: {optim.lr: {choice: [0.1]}}\n")
    with pytest.raises(ConfigError, match="recipe 'nowhere.yaml' not found"):
        load_sweep(p)


def test_pbt_perturbs_the_temperature(tmp_path, repo_root):
    s = load_sweep(_write(tmp_path, repo_root,
                          "overrides: [loss.learn_temperature=false, train.checkpoint_every=5]\n"
                          "space: {loss.temperature_init: {grid: [0.02, 0.5]}, optim.lr: {grid: [0.001]}}\n"
                          "scheduler: {name: pbt, perturbation_interval: 5, quantile_fraction: 0.5, synch: true}\n"))
    pbt = scheduler(s)
    assert type(pbt).__name__ == "PopulationBasedTraining"
    assert pbt._perturbation_interval == 5 and pbt._quantile_fraction == 0.5 and pbt._synch
    # only the temperature is perturbed, anywhere between the grid's extremes (the grid is the initial population)
    (key, dom), = pbt._hyperparam_mutations.items()
    assert key == "loss.temperature_init" and (dom.lower, dom.upper) == (0.02, 0.5)
    assert param_space(s)["loss.temperature_init"] == {"grid_search": [0.02, 0.5]}


# --- refused before anything starts: metric, scheduler settings Tune asserts on, ranges over integer keys, data ---

PBT_OK = "overrides: [loss.learn_temperature=false, train.checkpoint_every=5]\n"


@pytest.mark.parametrize("body, expected", [
    # a metric no trial reports (ASHA would never stop anything and no best would be found)
    ("space: {optim.lr: {choice: [0.1]}}\nmetric: eval/zeroshot/top7\n",
     "metric=eval/zeroshot/top7 is not logged by recipe debug.yaml: it logs "),
    ("space: {optim.lr: {choice: [0.1]}}\nmetric: eval/zershot/top1\n", "(Did you mean 'eval/zeroshot/top1'?)"),
    ("space: {optim.lr: {choice: [0.1]}}\nmetric: eval/zeroshot/top7\n", "train/loss_i2t, train/loss_t2i, train/lr"),
    ("space: {optim.lr: {choice: [0.1]}}\nmetric: train/loss_pos\nmode: min\n",
     "not logged by recipe debug.yaml: it logs"),
    # logged by the base recipe, but not by every searched value
    ("space: {loss.name: {grid: [clip, siglip]}}\nmetric: train/loss_i2t\nmode: min\n",
     "metric=train/loss_i2t is not logged by recipe debug.yaml when space.loss.name=siglip: it logs"),
    ("space: {evals.zeroshot.ks: {choice: [[1, 2], [1, 5]]}}\nmetric: eval/zeroshot/top5\n",
     "when space.evals.zeroshot.ks=[1, 2]: it logs"),
    ("overrides: ['evals={retrieval: {type: retrieval}}']\nspace: {optim.lr: {choice: [0.1]}}\n",
     "metric=eval/zeroshot/top1 is not logged"),
    # ASHA: Tune asserts grace_period <= max_t (the trials' steps); equal, it could never stop a trial
    ("space: {optim.lr: {choice: [0.1]}}\nscheduler: {name: asha, grace_period: 10}\n",
     "scheduler.grace_period=10: no trial trains more than 10 steps, so ASHA could never stop one"),
    ("space: {train.steps: {grid: [20, 30]}}\nscheduler: {name: asha, grace_period: 40}\n",
     "no trial trains more than 30 steps"),
    # PBT: Tune refuses a search algorithm with it; an interval no trial reaches; a population of one
    (PBT_OK + "space: {loss.temperature_init: {choice: [0.05, 0.5]}}\nsearch: {algorithm: optuna, num_samples: 4}\n"
     "scheduler: {name: pbt, perturbation_interval: 5}\n", "use search.algorithm=grid or random"),
    (PBT_OK + "space: {loss.temperature_init: {grid: [0.05, 0.5]}}\n"
     "scheduler: {name: pbt, perturbation_interval: 10}\n",
     "scheduler.perturbation_interval=10: trials of 10 steps end before the first perturbation"),
    (PBT_OK + "space: {loss.temperature_init: {choice: [0.05, 0.5]}}\nsearch: {algorithm: random}\n"
     "scheduler: {name: pbt, perturbation_interval: 5}\n", "this sweep has 1 trial"),
    # a float range over an integer key would fail every trial
    ("space: {train.steps: {uniform: [10.5, 40]}}\n",
     "space.train.steps.uniform=[10.5, 40]: train.steps takes integers"),
    ("space: {data.micro_batch: {loguniform: [4, 16.0]}}\n", "data.micro_batch takes integers"),
    ("space: {optim.lr: {uniform: [low, high]}}\n", "space.optim.lr.uniform=['low', 'high']: the bounds must be"),
    ("space: {optim.lr: {loguniform: [.nan, 1]}}\n", "the bounds must be finite numbers"),
    # a choice value of the wrong type: the recipe refuses it when loaded with that value
    ("space: {train.steps: {choice: [10, 2.5]}}\n", "space.train.steps=2.5"),
    # a sweep name is a directory under storage_path: not its parent, nothing a file system or MLflow would mangle
    ("name: '..'\nspace: {optim.lr: {choice: [0.1]}}\n", "a sweep name is 1 to 100 printable characters, not '.' or '..'"),
    ("name: a/b\nspace: {optim.lr: {choice: [0.1]}}\n", "name='a/b': a sweep name"),
    ("name: ''\nspace: {optim.lr: {choice: [0.1]}}\n", "name='': a sweep name"),
    (f"name: {'x' * 101}\nspace: {{optim.lr: {{choice: [0.1]}}}}\n", "a sweep name is 1 to 100"),
    ("name: 'a/b'\nspace: {optim.lr: {choice: [0.1]}}\n", "without '/'"),
    # both bounds of a range are loaded, not only the first
    ("space: {loss.temperature_init: {uniform: [0.05, 2]}}\n", "space.loss.temperature_init=2: "),
    # replicates and sample budgets
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
def test_more_bad_sweeps_are_one_line(tmp_path, repo_root, body, expected):
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, repo_root, body))
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("body", [
    "space: {optim.lr: {choice: [0.1]}}\nmetric: train/loss\nmode: min\n",
    "space: {optim.lr: {choice: [0.1]}}\nmetric: eval/retrieval/recall_at_5_i2t\n",
    "space: {optim.lr: {choice: [0.1]}}\nmetric: eval/geometry/modality_gap\nmode: min\n",
    "space: {evals.zeroshot.ks: {choice: [[1, 3], [3, 5]]}}\nmetric: eval/zeroshot/top3\n",
    "space: {loss.name: {grid: [clip, siglip]}}\nmetric: train/loss\nmode: min\n",
    "space: {loss.name: {grid: [clip, hard_negative_mixing]}}\nmetric: eval/zeroshot/top1\n",
])
def test_metrics_every_trial_logs_are_accepted(tmp_path, repo_root, body):
    load_sweep(_write(tmp_path, repo_root, body))


def test_asha_max_t_is_the_most_steps_of_a_trial(tmp_path, repo_root):
    from towerlab.sweep.load import trial_plan

    p = _write(tmp_path, repo_root, "space: {train.steps: {grid: [20, 300]}}\n"
                                    "scheduler: {name: asha, grace_period: 25}\n")
    s = load_sweep(p)
    plan = trial_plan(s, p)
    assert (plan.min_steps, plan.max_steps) == (20, 300)
    # Tune's default max_t (100) would stop the 300-step trials at step 100
    # one past it: a trial that trains its 300 steps finishes (ASHA stops whatever reaches max_t, recorded KILLED)
    assert scheduler(s, plan.max_steps)._max_t == 301


def test_integer_ranges_are_sampled_as_integers(tmp_path, repo_root):
    from ray.tune.search.sample import Float, Integer

    from towerlab.sweep.load import trial_plan

    p = _write(tmp_path, repo_root, "space: {train.steps: {uniform: [10, 40]}, "
                                    "data.global_batch: {loguniform: [16, 64]},"
                                    " optim.weight_decay: {uniform: [0, 1]}, optim.lr: {loguniform: [1.0e-4, 1]}}\n"
                                    "search: {algorithm: random}\n")
    s = load_sweep(p)
    plan = trial_plan(s, p)
    assert plan.int_keys == {"train.steps", "data.global_batch"}  # weight_decay is a float key with int bounds
    space = param_space(s, plan.int_keys)
    steps, batch, wd = space["train.steps"], space["data.global_batch"], space["optim.weight_decay"]
    assert isinstance(steps, Integer) and isinstance(batch, Integer) and isinstance(wd, Float)
    assert (steps.lower, steps.upper) == (10, 41)  # Tune's upper bound is exclusive: both bounds can be drawn
    assert isinstance(batch.get_sampler(), Integer._LogUniform)
    draws = [d.sample(random_state=i) for i in range(200) for d in (steps, batch)]  # one value per trial, as Tune
    assert all(type(v) is int for v in draws)
    assert {steps.sample(random_state=i) for i in range(300)} >= {10, 40} and 16 <= min(draws[1::2])
    assert max(draws[1::2]) <= 64 and all(type(wd.sample(random_state=i)) is float for i in range(20))


def test_needs_labels_loss_searched_on_unlabelled_data_is_refused(tmp_path, repo_root):
    shards = tmp_path / "web"
    shards.mkdir()  # parquet shards without a towerlab manifest: foreign data, label -1 everywhere
    body = (f"overrides: [data.source=parquet, 'data.path={shards}', 'evals={{}}']\nmetric: train/loss\nmode: min\n")
    load_sweep(_write(tmp_path, repo_root, body + "space: {loss.name: {grid: [clip, siglip]}}\n"))
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, repo_root, body + "space: {loss.name: {grid: [clip, sdm]}}\n"))
    assert f"space.loss.name=sdm: loss.name=sdm needs class labels or several captions per image; data {shards} " \
           "has no class labels and one caption per record" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="loss.name=mw_auc takes its positives from class labels"):
        load_sweep(_write(tmp_path, repo_root, body + "space: {loss.name: {choice: [mw_auc]}}\n"))
    # the built-in sources have class labels
    load_sweep(_write(tmp_path, repo_root, "space: {loss.name: {grid: [sdm, mw_auc, decoupled_softmax]}}\n"))


SWEEPS = Path(__file__).resolve().parents[3] / "sweeps"


@pytest.mark.parametrize("name", sorted(p.name for p in SWEEPS.glob("*.yaml")))
def test_shipped_sweeps_load(repo_root, name):
    from towerlab.sweep.load import trial_plan

    path = repo_root / "sweeps" / name
    s = load_sweep(path)
    plan = trial_plan(s, path)
    param_space(s, plan.int_keys)
    scheduler(s, plan.max_steps)


# replicates (search.seeds) and compute-matched budgets (train.samples, scheduler.time=samples)

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
