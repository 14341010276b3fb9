import pytest

from towerlab.config import ConfigError
from towerlab.sweep.load import load_sweep
from towerlab.sweep.space import param_space, scheduler


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
