"""The validation layer: Enum fields refuse values outside their set, declared ranges hold for every numeric key,
section rules and the loss family's parameter rules run at load, and every failure is one ConfigError line naming
the key."""

import dataclasses
import math
import typing

import pytest

import towerlab.losses as L
from towerlab.config import ConfigError, to_dict, to_yaml
from towerlab.config.checks import INT64_MAX, Range, check_ranges, field_range, num
from towerlab.config.schema import Offload, Precision, Recipe, Schedule
from towerlab.train.recipe import load_recipe

RECIPE = "recipes/digits_clip.yaml"


@pytest.fixture(autouse=True)
def _cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


# One row per kind of mistake: the override, and what the one-line message must contain (the key, and the rule or
# the valid values).
BAD = [
    ("optim.schedule=cosin", "optim.schedule='cosin' is not allowed. Did you mean 'cosine'? Use one of: cosine, constant"),
    ("train.precision=fp16", "train.precision='fp16' is not allowed. Did you mean 'bf16'? Use one of: auto, fp32, bf16"),
    ("train.offload_param=gpu", "train.offload_param='gpu' is not allowed. Did you mean 'cpu'? Use one of: none, cpu, nvme"),
    ("data.bad_shards=ignore", "data.bad_shards='ignore' is not allowed. Use one of: error, skip"),
    ("optim.lr=-1", "optim.lr=-1: must be > 0"),
    ("optim.lr=nan", "optim.lr=nan: not a finite number; must be > 0"),
    ("optim.lr=inf", "optim.lr=inf: not a finite number; must be > 0"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: AdamW takes two betas"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: must be in [0, 1)"),
    ("optim.eps=0", "optim.eps=0: must be > 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2: must be in [0, 1]"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1: must be at least 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: must be at least 1"),
    ("train.steps=0", "train.steps=0: must be at least 1"),
    ("train.max_failures=-2", "train.max_failures=-2: must be at least -1"),
    ("train.zero_stage=-1", "train.zero_stage=-1: must be in [0, 3] (DeepSpeed ZeRO stages are 0, 1, 2, 3)"),
    (f"seed={INT64_MAX + 1}", f"seed={INT64_MAX + 1}: must be in [0, {INT64_MAX}]"),
    ("seed=-1", "seed=-1: must be in [0, "),
    ("data.global_batch=1", "data.global_batch=1: must be at least 2 (a contrastive batch needs at least 2 samples)"),
    ("data.augment.crop_scale_min=0", "data.augment.crop_scale_min=0: must be in (0, 1]"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5: must be at least 0"),
    ("model.embed_dim=0", "model.embed_dim=0: must be at least 1"),
    ("model.vision.mlp_ratio=0", "model.vision.mlp_ratio=0: must be > 0"),
    ("model.text.heads=0", "model.text.heads=0: must be at least 1"),
    ("eval.batch_size=0", "eval.batch_size=0: must be at least 1"),
    ("evals.zeroshot.ks=[1,0]", "evals.zeroshot.ks=[1, 0]: must be at least 1"),
    ("evals.retrieval.chunk=0", "evals.retrieval.chunk=0: must be at least 1"),
    ("name=a/b", "name='a/b': a run name is 1 to 100 printable characters, not '.' or '..', without '/'"),
    ("loss.label_smoothing=1.0", "loss.label_smoothing=1: must be in [0, 1)"),
    ("loss.max_logit_scale=0.5", "loss.max_logit_scale=0.5: must be at least 1"),
    ("loss.temperature_init=0", "loss.temperature_init=0: must be > 0"),
    ("loss.tile_size=0", "loss.tile_size=0: must be at least 1"),
    ("loss.bias_init=nan", "loss.bias_init=nan: not a finite number"),
    ("loss.name=sdm loss.epsilon=0", "loss.epsilon=0: must be > 0"),
    ("loss.name=sdm loss.tiled=true", "loss.tiled=true: loss 'sdm' has no tiled kernel; set loss.tiled=false"),
    ("loss.name=dcl loss.bias_init=-10", "loss.bias_init=-10: loss 'dcl' does not use a logit bias"),
    ("loss.name=dclw loss.sigma=-1", "loss.sigma=-1: must be > 0"),
    ("loss.name=cwcl loss.weights_from=audio", "loss.weights_from='audio': must be one of loss.modalities"),
    ("loss.name=cwcl loss.weight_temperature=0", "loss.weight_temperature=0: must be > 0"),
    ("loss.name=gram loss.modalities=[text,image] loss.volume_eps=-1", "loss.volume_eps=-1: must be at least 0"),
    ("loss.name=multihead loss.num_heads=0", "loss.num_heads=0: must be at least 1"),
    ("loss.name=hard_negative_mixing loss.num_hard=0", "loss.num_hard=0: must be at least 1"),
    ("loss.name=hard_negative_mixing loss.num_mix=0 loss.num_query_mix=0", "loss.num_mix=0: with loss.num_query_mix=0"),
    ("loss.name=symile loss.modalities=[image,text] loss.seed=-3", "loss.seed=-3: must be in [0, "),
    ("loss.name=align_uniform loss.uniformity_t=0", "loss.uniformity_t=0: must be > 0"),
    ("loss.modalities=[image,image]", "loss.modalities=['image', 'image']: repeats a modality"),
]


@pytest.mark.parametrize("overrides, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_override_is_one_config_error_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, overrides.split())
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_enum_fields_load_as_their_enum_and_serialise_as_plain_strings():
    r = load_recipe(RECIPE, ["optim.schedule=constant", "train.precision=fp32"])
    assert r.optim.schedule is Schedule.constant and r.train.precision is Precision.fp32
    assert r.train.offload_param is Offload.none
    d = to_dict(r)
    assert type(d["optim"]["schedule"]) is str and d["optim"]["schedule"] == "constant"
    assert "schedule: constant" in to_yaml(r)


def _numeric(hint) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, list):
        return any(_numeric(a) for a in args)
    return hint in (int, float)


def _schema_classes():
    """Every dataclass a recipe or a sweep file is made of: the sections (recursively), every loss family's
    config, the evaluator entries."""
    from towerlab.config.schema import EvaluatorConfig
    from towerlab.sweep.schema import SweepConfig

    seen, todo = [], [Recipe, SweepConfig, EvaluatorConfig, *(L.config_class(n) for n in L.LOSSES.names())]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for t in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(t):
                todo.append(t)
    return seen


def test_every_numeric_key_has_a_range():
    missing = [f"{cls.__name__}.{name}" for cls in _schema_classes()
               for name, hint in typing.get_type_hints(cls).items()
               if name in {f.name for f in dataclasses.fields(cls)} and _numeric(hint)
               and field_range(cls, name) is None]
    assert not missing, f"numeric fields without a declared range (use config.checks.num): {missing}"


def test_every_default_is_inside_its_range():
    for cls in _schema_classes():
        check_ranges(cls(), cls.__name__)


def test_range_bounds_and_messages():
    assert 0.5 in Range(0, 1) and 0 in Range(0, 1) and 0 not in Range(0, 1, lo_open=True)
    assert 1 not in Range(0, 1, hi_open=True) and math.nan not in Range() and math.inf not in Range(0)
    assert True not in Range()  # a bool is not a number here
    assert 10**400 not in Range(0, INT64_MAX) and 10**400 in Range(0)  # no float conversion of big ints
    assert Range(0, 1, False, True).describe() == "must be in [0, 1)"
    assert Range(1).describe() == "must be at least 1" and Range(0, lo_open=True).describe() == "must be > 0"
    assert Range(None, 3, why="x").describe() == "must be at most 3 (x)"


def test_a_subclass_that_changes_a_default_keeps_the_range():
    @dataclasses.dataclass
    class Base:
        rate: float = num(0.5, gt=0)

    @dataclasses.dataclass
    class Child(Base):
        rate: float = 0.25

    assert field_range(Child, "rate") == Range(0, None, True, False)
    with pytest.raises(ConfigError, match=r"^x.rate=-1: must be > 0$"):
        check_ranges(Child(rate=-1.0), "x")


@pytest.mark.parametrize("name, params, key", [
    ("sdm", {"epsilon": 0.0}, "loss.epsilon=0"),
    ("dclw", {"sigma": -1.0}, "loss.sigma=-1"),
    ("clip", {"label_smoothing": 1.5}, "loss.label_smoothing=1.5"),
    ("multihead", {"num_heads": 0}, "loss.num_heads=0"),
    ("gram", {"volume_eps": -1.0}, "loss.volume_eps=-1"),
    ("clip", {"label_smoothing": "lots"}, "loss.label_smoothing='lots'"),
    ("clip", {"label_smothing": 0.1}, "'label_smothing'"),
])
def test_build_raises_config_errors_naming_the_key(name, params, key):
    with pytest.raises(ConfigError) as e:
        L.build(name, **params)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_runtime_shape_errors_stay_value_errors():
    import torch

    fn = L.build("multihead", num_heads=4)
    x = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    with pytest.raises(ValueError) as e:
        fn({"image": x, "text": x}, logit_scale=torch.tensor(10.0))
    assert not isinstance(e.value, ConfigError)


def _documented_fields(cls) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal right after the field), from the class's source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
            out[stmt.target.id] = doc if isinstance(doc, str) else ""
    return out


def test_every_config_field_has_an_attribute_docstring():
    # The docs generator reads `field: T = default` followed by a string literal; a field may be documented in the
    # class that declares it first (e.g. LossConfig's, LogitScaleInit's) when a subclass only changes its default.
    from towerlab.losses.base import LogitScaleInit, LossConfig

    missing = []
    for cls in _schema_classes() + [LossConfig, LogitScaleInit]:
        docs = {}
        for c in reversed(cls.__mro__):
            if dataclasses.is_dataclass(c) and c is not object:
                docs.update({k: v for k, v in _documented_fields(c).items() if v or k not in docs})
        own = _documented_fields(cls)
        for f in dataclasses.fields(cls):
            text = own.get(f.name) if f.name in own else docs.get(f.name)
            if not text or not text.strip().endswith("."):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"fields without a one-sentence attribute docstring: {missing}"
