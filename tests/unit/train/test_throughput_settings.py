"""The throughput settings of a recipe: optim.implementation (torch's AdamW kernels, refused where torch has none
for the device), train.compile (the towers compiled in place, same names, same outputs) and
model.vision.patch_dropout's checks."""

from __future__ import annotations

import pytest
import torch

from towerlab.config import ConfigError
from towerlab.train.module import build_module
from towerlab.train.optim import build_optimizer, supported_devices
from towerlab.train.recipe import load_recipe


def _recipe(repo_root, *overrides):
    return load_recipe(repo_root / "recipes" / "debug.yaml", ["train.workers=1", *overrides])


@pytest.mark.parametrize("impl,flags", [("auto", {"foreach": None, "fused": None}),
                                        ("forloop", {"foreach": False, "fused": False}),
                                        ("fused", {"fused": True})])
def test_implementation_reaches_torch_adamw_and_steps_the_same(repo_root, impl, flags):
    if impl == "fused" and "cpu" not in supported_devices("fused"):
        pytest.fail("this torch has no fused AdamW on CPU; the test needs one that has")
    r = _recipe(repo_root, f"optim.implementation={impl}")
    module = build_module(r, 0, 1)
    opt, _ = build_optimizer(module, r.optim, 10)
    for k, v in flags.items():
        assert opt.defaults[k] == v
    ref_module = build_module(_recipe(repo_root, "optim.implementation=forloop"), 0, 1)
    ref, _ = build_optimizer(ref_module, r.optim, 10)
    for m, o in ((module, opt), (ref_module, ref)):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        o.step()
    for a, b in zip(module.parameters(), ref_module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_implementation_refused_where_torch_has_no_kernel(repo_root, monkeypatch):
    with pytest.raises(ConfigError, match=r"optim.implementation='adam'.*auto, foreach, fused, forloop"):
        _recipe(repo_root, "optim.implementation=adam")
    if "cpu" not in supported_devices("foreach"):  # torch has foreach kernels for accelerators only
        with pytest.raises(ConfigError, match=r"^optim.implementation=foreach: torch .* has no foreach AdamW on cpu"):
            _recipe(repo_root, "optim.implementation=foreach")
    import towerlab.train.optim as optim

    monkeypatch.setattr(optim, "supported_devices", lambda impl: ["cuda"])
    with pytest.raises(ConfigError, match="no fused AdamW on cpu .only on cuda.; use auto or forloop"):
        _recipe(repo_root, "optim.implementation=fused")
    with pytest.raises(ConfigError, match="offloaded optimizer is DeepSpeed's CPU Adam"):
        _recipe(repo_root, "optim.implementation=fused", "train.offload_optimizer=cpu")


def test_patch_dropout_checks(repo_root):
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=rf"model.vision.patch_dropout={float(bad):g}: must be in \[0, 1\)"):
            _recipe(repo_root, f"model.vision.patch_dropout={bad}")
    with pytest.raises(ConfigError, match="not to a pretrained vision tower"):
        _recipe(repo_root, "model.vision.patch_dropout=0.5", "model.vision.pretrained=timm:vit_tiny_patch16_224")
    assert _recipe(repo_root, "model.vision.patch_dropout=0.5").model.vision.patch_dropout == 0.5


def test_compile_wraps_each_tower_in_place(repo_root):
    plain = build_module(_recipe(repo_root), 0, 1)
    compiled = build_module(_recipe(repo_root, "train.compile=true"), 0, 1)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert all(t._compiled_call_impl is not None for t in compiled.model.towers.values())
    assert all(t._compiled_call_impl is None for t in plain.model.towers.values())


@pytest.mark.slow
def test_compiled_towers_compute_what_eager_ones_do(repo_root):
    r = _recipe(repo_root)
    v, t = r.model.vision, r.model.text
    x = {"image": torch.randn(4, 3, v.image_size, v.image_size), "text": torch.randint(1, t.vocab_size,
                                                                                       (4, t.context_length))}
    eager = build_module(r, 0, 1).model
    compiled = build_module(_recipe(repo_root, "train.compile=true"), 0, 1).model
    out_e, out_c = eager(x), compiled(x)
    for m in x:
        torch.testing.assert_close(out_c[m], out_e[m], atol=1e-5, rtol=1e-5)
    sum(f.sum() for f in out_c.values()).backward()
    assert compiled.towers["image"].conv1.weight.grad is not None
