import math

import torch

from towerlab.config import ModelConfig
from towerlab.models import ContrastiveModel, archs, arch_preset
from towerlab.train.optim import lr_factor, param_groups
from towerlab.config import OptimConfig
from omegaconf import OmegaConf


def _cfg(arch: str) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), arch_preset(arch)))


def test_arch_files_are_found_by_scanning():
    assert {"debug", "digits"} <= set(archs().names())


def test_shapes_normalised_and_logit_scale():
    cfg = _cfg("debug")
    m = ContrastiveModel(cfg, temperature_init=0.07)
    images = torch.randn(5, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(3, cfg.text.vocab_size, (5, cfg.text.context_length))
    tokens[:, 7:] = 0
    out = m({"image": images, "text": tokens})
    assert out["image"].shape == (5, cfg.embed_dim) == out["text"].shape
    assert torch.allclose(out["image"].norm(dim=1), torch.ones(5), atol=1e-5)
    assert math.isclose(m.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    m.clamp_logit_scale()
    assert math.isclose(m.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


def test_text_pools_at_eot_not_padding():
    cfg = _cfg("debug")
    m = ContrastiveModel(cfg).eval()
    tokens = torch.zeros(1, cfg.text.context_length, dtype=torch.long)
    tokens[0, :4] = torch.tensor([5, 6, 7, 2])
    a = m.encode("text", tokens)
    tokens2 = tokens.clone()
    tokens2[0, 6] = 9  # a token after padding would change an EOT pool if pooling were wrong
    tokens2[0, 4:6] = 3
    b = m.encode("text", tokens2)
    assert not torch.allclose(a, b)
    tokens3 = tokens.clone()  # same prefix, same EOT: the causal mask means later padding cannot matter
    assert torch.allclose(a, m.encode("text", tokens3))


def test_no_weight_decay_groups():
    m = ContrastiveModel(_cfg("debug"), bias_init=-10.0)
    decay, no_decay = param_groups(m, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    assert id(m.logit_scale) in ids and id(m.logit_bias) in ids
    for name, p in m.named_parameters():
        if "ln_" in name or name.endswith(".bias") or "positional_embedding" in name:
            assert id(p) in ids, name
        if name.endswith("mlp.0.weight") or name.endswith("token_embedding.weight"):
            assert id(p) not in ids, name
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_warmup_cosine():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == 0.1 and lr_factor(9, cfg, 110) == 1.0
    assert abs(lr_factor(60, cfg, 110) - (0.1 + 0.9 * 0.5)) < 1e-9
    assert abs(lr_factor(110, cfg, 110) - 0.1) < 1e-9
