"""The loss library's API: registry, build's validation, config classes, the call convention."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

import towerlab.losses as L
from towerlab.losses.base import LossConfig
from towerlab.registry import RegistryError


def test_unknown_name_lists_valid_names():
    with pytest.raises(RegistryError) as e:
        L.build("clpi")
    msg = str(e.value)
    assert "clpi" in msg and "Did you mean 'clip'" in msg and "clip" in msg.split("Valid:")[1]


def test_unknown_parameter_is_one_clear_line():
    with pytest.raises(ValueError) as e:
        L.build("clip", label_smothing=0.1)
    msg = str(e.value)
    assert "\n" not in msg
    assert "'label_smothing'" in msg and "Did you mean 'label_smoothing'" in msg and "temperature_init" in msg


def test_wrong_type_is_rejected():
    with pytest.raises(ValueError, match="label_smoothing"):
        L.build("clip", label_smoothing="lots")


def test_every_family_has_a_typed_config_omegaconf_accepts():
    for name in L.LOSSES.names():
        cls = L.config_class(name)
        assert issubclass(cls, LossConfig)
        cfg = cls()
        assert cfg.name == name, f"{name}: default name field is {cfg.name}"
        schema = OmegaConf.structured(cls)
        obj = OmegaConf.to_object(OmegaConf.merge(schema, {"temperature_init": 0.05}))
        assert obj.temperature_init == 0.05
        L.from_config(obj)  # the config layer's object builds
        assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                   for f in dataclasses.fields(cls))


def test_build_accepts_name_keyword_from_asdict():
    cfg = L.config_class("clip")(label_smoothing=0.1)
    fn = L.build(**dataclasses.asdict(cfg))
    assert fn.cfg.label_smoothing == 0.1


def test_missing_modality_is_reported():
    fn = L.build("clip")
    with pytest.raises(KeyError, match="text"):
        fn({"image": torch.randn(4, 3)}, logit_scale=torch.tensor(1.0))


def test_bf16_features_give_fp32_terms():
    fn = L.build("clip")
    f = {m: torch.nn.functional.normalize(torch.randn(6, 8), dim=1).bfloat16() for m in ("image", "text")}
    out = fn(f, logit_scale=torch.tensor(100.0))
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.values())


# The logit-scale initial values: declared once (LogitScaleInit), each family's default as a class keyword.
FAMILY_LOGIT_DEFAULTS = {"align_uniform": (0.07, None), "clip": (0.07, None), "cwcl": (0.07, None),
                         "dcl": (0.1, None), "dclw": (0.1, None), "decoupled_softmax": (0.05, None),
                         "gram": (0.07, None), "hard_negative_mixing": (0.07, None), "multihead": (0.07, None),
                         "mw_auc": (0.07, None), "sdm": (0.02, None), "siglip": (0.1, -10.0), "symile": (0.07, None)}


def test_each_family_keeps_its_logit_scale_defaults_and_their_ranges():
    from towerlab.config.checks import field_range
    from towerlab.losses.base import LogitScaleInit

    assert set(FAMILY_LOGIT_DEFAULTS) == set(L.LOSSES.names())
    for name, (tau, bias) in FAMILY_LOGIT_DEFAULTS.items():
        cls = L.config_class(name)
        assert issubclass(cls, LogitScaleInit)
        cfg = cls()
        assert (cfg.temperature_init, cfg.bias_init) == (tau, bias), name
        names = [f.name for f in dataclasses.fields(cls)]
        assert names[:3] == ["name", "temperature_init", "bias_init"], name
        for key in ("temperature_init", "bias_init"):
            assert field_range(cls, key) is field_range(LogitScaleInit, key) is not None
            assert cls.__dataclass_fields__[key].metadata == LogitScaleInit.__dataclass_fields__[key].metadata


def test_a_family_default_is_a_class_keyword_and_only_those_two():
    from towerlab.losses.base import LossConfig

    @dataclasses.dataclass
    class Warm(LossConfig, temperature_init=0.5, bias_init=-2.0):
        name: str = "warm"

    assert (Warm().temperature_init, Warm().bias_init) == (0.5, -2.0)
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Warm), {"temperature_init": 0.2})).temperature_init == 0.2
    with pytest.raises(TypeError, match="tau_init"):
        @dataclasses.dataclass
        class Bad(LossConfig, tau_init=0.5):
            pass
