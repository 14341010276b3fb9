"""SigLIP's architecture in towerlab's towers, checked against an implementation towerlab did not write: a tiny
random transformers SiglipModel saved to disk (with a max_length-padding tokenizer and a SiglipImageProcessor),
imported with model.pretrained=hf:DIR; its own get_image_features / get_text_features are the reference. Then the
state-dict round trip, a training step with the sigmoid loss, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from towerlab.config import ConfigError
from towerlab.data.tokenizer import HFTokenizer
from towerlab.models import ContrastiveModel
from towerlab.models import adapters
from towerlab.train.module import build_module
from towerlab.train.recipe import load_recipe

from clip_testing import EOS, MEAN, SIGLIP_BIAS, SIGLIP_CONTEXT, SIGLIP_SCALE, STD, features, save_siglip

TEXTS = ["a photo of the digit seven", "three", "the the the digit of a photo x"]

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    return path, save_siglip(path)


def test_siglip_import_gives_transformers_embeddings(siglip_dir):
    from transformers import AutoTokenizer

    path, ref = siglip_dir
    recipe = load_recipe(None, [f"model.pretrained=hf:{path}", "loss.name=siglip"])
    m = recipe.model
    assert (m.embed_dim, m.vision.width, m.text.context_length) == (32, 32, SIGLIP_CONTEXT)
    assert (m.vision.pool, m.vision.class_token, m.vision.ln_pre, m.vision.patch_bias, m.vision.proj) == \
        ("map", False, False, True, False)
    assert (m.text.causal, m.text.pool, m.text.proj_bias) == (False, "end", True)
    assert (m.vision.act, m.text.act, m.vision.ln_eps, m.text.ln_eps) == ("gelu_tanh", "gelu_tanh", 1e-6, 1e-6)
    assert m.vision.mean == pytest.approx(MEAN) and m.vision.std == pytest.approx(STD)
    model = ContrastiveModel(m, temperature_init=recipe.loss.temperature_init,
                             bias_init=recipe.loss.bias_init).eval()
    assert model.logit_scale.item() == pytest.approx(SIGLIP_SCALE)
    assert model.logit_bias.item() == pytest.approx(SIGLIP_BIAS)

    # towerlab's tokenizer path pads as SiglipProcessor's tokenizer does (padding="max_length", its pad token)
    ids = HFTokenizer(f"hf:{path}", m.text.context_length).encode_batch(TEXTS)
    theirs = AutoTokenizer.from_pretrained(path)(TEXTS, padding="max_length", return_tensors="np")["input_ids"]
    assert ids.tolist() == theirs.tolist() and ids.shape == (3, SIGLIP_CONTEXT)
    assert (ids == EOS).sum(axis=1).tolist() == [1, 1, 1] and (ids[:, -1] == 0).all()  # padded to the end
    tokens = torch.from_numpy(ids)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_i, ours_t = model.towers["image"](images), model.towers["text"](tokens)
        ref_i = features(ref.get_image_features(pixel_values=images))
        ref_t = features(ref.get_text_features(input_ids=tokens))
    torch.testing.assert_close(ours_i, ref_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_t, ref_t, atol=1e-5, rtol=0)
    assert ours_i.abs().max() > 0.1 and ours_t.abs().max() > 0.1  # the comparison is not of zeros
    # without the sigmoid loss the bias has no parameter to go to; the towers load all the same
    plain = ContrastiveModel(load_recipe(None, [f"model.pretrained=hf:{path}"]).model).eval()
    assert plain.logit_bias is None
    with torch.no_grad():
        torch.testing.assert_close(plain.towers["image"](images), ref_i, atol=1e-5, rtol=0)


def test_hf_to_towerlab_to_hf_is_the_identity(siglip_dir):
    _, ref = siglip_dir
    sd = ref.state_dict()
    back = adapters.to_hf_siglip(adapters.from_hf_siglip(sd))
    assert set(back) == {k for k in sd if not k.endswith("position_ids")}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


def test_two_training_steps_with_the_sigmoid_loss(siglip_dir):
    path, _ = siglip_dir
    recipe = load_recipe(None, [f"model.pretrained=hf:{path}", "loss.name=siglip"])
    module = build_module(recipe, rank=0, world_size=1).train()
    assert module.model.logit_bias.item() == pytest.approx(SIGLIP_BIAS)  # the import's, not loss.bias_init
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    tokens = torch.from_numpy(HFTokenizer(f"hf:{path}", SIGLIP_CONTEXT).encode_batch(TEXTS + ["x y"]))
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    probe = module.model.towers["image"].attn_pool.probe
    before = probe.detach().clone()
    losses = []
    for step in range(2):
        out = module({"image": images, "text": tokens}, step=step)
        opt.zero_grad()
        out["loss"].backward()
        assert probe.grad is not None and probe.grad.abs().sum() > 0
        assert module.model.logit_bias.grad is not None
        assert module.model.towers["text"].text_projection_bias.grad.abs().sum() > 0
        opt.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses))) and not torch.equal(probe, before)


def test_differing_options_and_parameters_are_named(siglip_dir, tmp_path):
    path, ref = siglip_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["vision_use_head"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"vision_config\.vision_use_head=false: a SigLIP ViT without its "
                                          r"pooling head") as e:
        load_recipe(None, [f"model.pretrained=hf:{tmp_path}"])
    assert "\n" not in str(e.value)
    cfg["vision_config"]["vision_use_head"] = True
    cfg["text_config"]["hidden_act"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"text_config\.hidden_act='relu': towerlab's towers have"):
        load_recipe(None, [f"model.pretrained=hf:{tmp_path}"])

    sd = dict(ref.state_dict())
    sd["vision_model.embeddings.class_embedding"] = torch.zeros(32)
    with pytest.raises(ConfigError, match=r"parameter vision_model\.embeddings\.class_embedding has no place") as e:
        adapters.from_hf_siglip(sd)
    assert "\n" not in str(e.value)
    del sd["vision_model.embeddings.class_embedding"], sd["vision_model.head.probe"]
    with pytest.raises(ConfigError, match=r"parameter vision_model\.head\.probe is missing"):
        adapters.from_hf_siglip(sd)


def test_siglip_options_need_each_other():
    with pytest.raises(ConfigError, match=r"model\.vision\.pool=token with model\.vision\.class_token=false"):
        load_recipe(None, ["model.vision.class_token=false"])
    with pytest.raises(ConfigError, match=r"model\.vision\.proj=false: .*model\.embed_dim=32 must equal "
                                          r"model\.vision\.width=64"):
        load_recipe(None, ["model.vision.proj=false", "model.embed_dim=32", "model.vision.width=64"])
    with pytest.raises(ConfigError, match=r"model\.vision\.pool='cls': use token"):
        load_recipe(None, ["model.vision.pool=cls"])


def test_default_towers_are_unchanged():
    """The SigLIP options' defaults are CLIP's: a class token, a pre-LayerNorm, a projection, no pooling head or
    biases the CLIP towers lack, torch's LayerNorm epsilon, a causal text mask."""
    m = load_recipe(None, []).model
    torch.manual_seed(0)
    model = ContrastiveModel(m)
    names = set(dict(model.named_parameters()))
    assert {"towers.image.class_embedding", "towers.image.ln_pre.weight", "towers.image.proj"} <= names
    assert not any("attn_pool" in n or "projection_bias" in n or n == "towers.image.conv1.bias" for n in names)
    assert model.towers["image"].positional_embedding.shape[0] == (m.vision.image_size // m.vision.patch_size) ** 2 + 1
    assert model.towers["text"].ln_final.eps == 1e-5 and model.towers["text"].causal


def test_the_checkpoint_decides_the_shape(siglip_dir, tmp_path):
    """SigLIP options in the recipe do not survive a CLIP import, nor CLIP's a SigLIP import: the checkpoint's
    configuration rewrites them."""
    from clip_testing import save_clip

    path, _ = siglip_dir
    m = load_recipe(None, [f"model.pretrained=hf:{path}", "model.vision.pool=token", "model.vision.class_token=true",
                           "model.text.causal=true"]).model
    assert (m.vision.pool, m.vision.class_token, m.text.causal) == ("map", False, False)
    save_clip(tmp_path)
    m = load_recipe(None, [f"model.pretrained=hf:{tmp_path}", "model.vision.pool=map",
                           "model.vision.class_token=false", "model.text.proj_bias=true"]).model
    assert (m.vision.pool, m.vision.class_token, m.text.proj_bias, m.vision.ln_eps) == ("token", True, False, 1e-5)
