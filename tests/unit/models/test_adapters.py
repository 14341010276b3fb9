"""Whole-checkpoint import (`model.pretrained`), checked against an implementation towerlab did not write: tiny
random CLIPModels built and saved by transformers, whose own get_image_features / get_text_features are the
reference (SiglipModel: test_siglip.py). Everything is on disk (no Hub)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from towerlab.config import ConfigError
from towerlab.data.pipeline import tokenizer_spec
from towerlab.data.tokenizer import HFTokenizer
from towerlab.models import ContrastiveModel
from towerlab.models import adapters
from towerlab.train.recipe import load_recipe

from clip_testing import EOS, MEAN, STD, features, save_clip


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return path, save_clip(path)


def test_clip_import_gives_transformers_embeddings(clip_dir):
    path, ref = clip_dir
    recipe = load_recipe(None, [f"model.pretrained=hf:{path}", "train.workers=1", "data.global_batch=4"])
    m = recipe.model
    assert (m.vision.width, m.vision.layers, m.text.context_length, m.embed_dim) == (32, 2, 10, 16)
    assert (m.vision.act, m.text.act, m.text.pool, m.text.eos_id) == ("quick_gelu", "quick_gelu", "eos", EOS)
    assert m.vision.mean == pytest.approx(MEAN) and m.vision.std == pytest.approx(STD)
    assert tokenizer_spec(recipe) == f"hf:{path}"  # the model's own tokenizer feeds the data pipeline
    model = ContrastiveModel(m, temperature_init=recipe.loss.temperature_init).eval()
    assert model.logit_scale.item() == pytest.approx(3.0)

    texts = ["a photo of the digit seven", "three", "the the the digit of a photo x"]
    ids = HFTokenizer(f"hf:{path}", m.text.context_length).encode_batch(texts)
    assert (ids == EOS).sum(axis=1).tolist() == [1, 1, 1]
    tokens = torch.from_numpy(ids)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_i, ours_t = model.towers["image"](images), model.towers["text"](tokens)
        ref_i = features(ref.get_image_features(pixel_values=images))
        ref_t = features(ref.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long()))
    torch.testing.assert_close(ours_i, ref_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_t, ref_t, atol=1e-5, rtol=0)
    assert ours_i.abs().max() > 0.1  # the comparison is not of zeros


def test_legacy_eos_id_2_pools_at_the_highest_id(tmp_path):
    """Configs written before transformers' PR #24773 say eos_token_id=2 and mean "the highest id" (OpenAI's
    end-of-text is its vocabulary's last id); with gelu, the other activation."""
    ref = save_clip(tmp_path, act="gelu", eos=2)
    m = load_recipe(None, [f"model.pretrained=hf:{tmp_path}"]).model
    assert (m.text.pool, m.vision.act) == ("argmax", "gelu")
    model = ContrastiveModel(m).eval()
    tokens = torch.tensor([[6, 7, 12, 3, 0, 0], [4, 9, 3, 0, 0, 0]])  # 12 and 9: each row's highest id
    with torch.no_grad():
        torch.testing.assert_close(model.towers["text"](tokens), features(ref.get_text_features(input_ids=tokens)),
                                   atol=1e-5, rtol=0)


def test_differing_options_and_parameters_are_named(clip_dir, tmp_path):
    path, _ = clip_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["layer_norm_eps"] = 1e-6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"vision_config\.layer_norm_eps=1e-06: towerlab's LayerNorms use 1e-05"):
        load_recipe(None, [f"model.pretrained=hf:{tmp_path}"])
    with pytest.raises(ConfigError, match="a whole checkpoint already holds both towers"):
        load_recipe(None, [f"model.pretrained=hf:{path}", "model.text.pretrained=hf:x"])

    sd = {k: v for k, v in adapters.to_hf_clip(ContrastiveModel(load_recipe(None, [
        f"model.pretrained=hf:{path}"]).model, ).state_dict()).items()}
    sd["vision_model.head.probe"] = torch.zeros(1, 1, 32)
    with pytest.raises(ConfigError, match=r"parameter vision_model\.head\.probe has no place in towerlab's towers"):
        adapters.from_hf_clip(sd)
    del sd["vision_model.head.probe"], sd["text_model.final_layer_norm.bias"]
    with pytest.raises(ConfigError, match=r"parameter text_model\.final_layer_norm\.bias is missing"):
        adapters.from_hf_clip(sd)


def test_shape_mismatch_names_the_parameter(clip_dir):
    path, _ = clip_dir
    m = load_recipe(None, [f"model.pretrained=hf:{path}"]).model
    model = ContrastiveModel(m)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["towers.text.positional_embedding"] = torch.zeros(7, 32)
    with pytest.raises(ConfigError, match=r"parameter towers\.text\.positional_embedding has shape \(7, 32\)"):
        adapters.load_mapped(model, sd, "model.pretrained")


def test_hf_to_towerlab_to_hf_is_the_identity(clip_dir):
    _, ref = clip_dir
    sd = ref.state_dict()
    back = adapters.to_hf_clip(adapters.from_hf_clip(sd))
    assert set(back) == {k for k in sd if not k.endswith("position_ids")}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


def test_image_mean_and_std_reach_the_decoder():
    from towerlab.data.images import decode, png_bytes

    pixels = np.full((4, 4, 3), 255, dtype=np.uint8)
    out = decode(png_bytes(pixels), 4, mean=MEAN, std=STD)
    np.testing.assert_allclose(out[:, 0, 0], (1.0 - np.array(MEAN)) / np.array(STD), rtol=1e-6)
    np.testing.assert_allclose(decode(png_bytes(pixels), 4)[:, 0, 0], [1.0, 1.0, 1.0])  # the default: [-1, 1]


def test_tiny_clip_for_the_finetune_recipe(tmp_path, repo_root):
    """`towerlab recipes tiny-clip DIR` writes a CLIPModel folder the fine-tuning recipe's smoke preset imports:
    the image tower locked (LiT), the digits' captions and prompts all in its tokenizer's vocabulary."""
    from towerlab.cli import main
    from towerlab.data.digits import CAPTIONS, NAMES, PROMPTS

    out = tmp_path / "tiny-clip"
    assert main(["recipes", "tiny-clip", str(out)]) == 0
    recipe = load_recipe(repo_root / "recipes" / "digits_clip_finetune.yaml",
                         ["preset=smoke", f"model.pretrained=hf:{out}"])
    model = ContrastiveModel(recipe.model)
    trains = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("towers.")}
    assert trains == {"text"}
    texts = [t.format(name=n, digit=d) for t in CAPTIONS + PROMPTS for d, n in enumerate(NAMES)]
    ids = HFTokenizer(recipe.model.pretrained, recipe.model.text.context_length).encode_batch(texts)
    assert not (ids == 1).any() and (ids == recipe.model.text.eos_id).sum(axis=1).tolist() == [1] * len(texts)
