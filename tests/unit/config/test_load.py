import pytest

from towerlab.config import ConfigError, resolve_batch
from towerlab.train.recipe import load_recipe

RECIPE = "recipes/digits_clip.yaml"


@pytest.fixture(autouse=True)
def _cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def test_defaults_recipe_overrides_precedence():
    r = load_recipe(RECIPE, ["train.steps=7", "loss.temperature_init=0.05", "model.vision.layers=1"])
    assert r.train.steps == 7  # override beats recipe (300)
    assert r.loss.temperature_init == 0.05
    assert r.optim.lr == 2.0e-3  # from the recipe
    assert r.optim.eps == 1e-6  # schema default
    assert r.model.vision.width == 96 and r.model.vision.layers == 1  # arch file, then override


def test_variant_schema_is_typed():
    r = load_recipe(RECIPE, ["loss.label_smoothing=0.1"])
    assert type(r.loss).__name__ == "ClipConfig" and r.loss.label_smoothing == 0.1


@pytest.mark.parametrize(
    "override, expected",
    [
        (["train.stepz=3"], "unknown key 'train.stepz'. Did you mean 'steps'?"),
        (["optim.lr=fast"], "wrong type for 'optim.lr'"),
        (["loss.name=sigclip"], "unknown loss 'sigclip'"),
        (["model.arch=vit_huge_typo"], "unknown architecture 'vit_huge_typo'"),
        (["loss.label_smothing=0.1"], "Did you mean 'label_smoothing'?"),
        (["data.global_batch=255"], "not divisible by train.workers=2"),
        (["data.micro_batch=100"], "not divisible by data.micro_batch=100 x train.workers=2"),
        (["model.vision.patch_size=5"], "not a multiple of model.vision.patch_size=5"),
        (["train.zero_stage=4"], "ZeRO stages are 0, 1, 2, 3"),
        (["trainsteps"], "not of the form key.path=value"),
        (["loss.temperature_init=5"], "use a tau in [0.01, 1]"),
        (["loss.modalities=[image,text,audio]"], "no tower for ['audio']"),
    ],
)
def test_bad_input_is_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, override)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file .* not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(p)


def test_batch_plan():
    p = resolve_batch(256, 2, 32)
    assert (p.micro_batch, p.accumulation, p.world_size, p.negatives) == (32, 4, 2, 255)
    assert resolve_batch(256, 2).accumulation == 1
    with pytest.raises(ConfigError):
        resolve_batch(256, 3)
