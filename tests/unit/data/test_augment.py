"""Augmentations (colour jitter, caption choice, token masking, stop-word removal), several captions per image as
positives, and the recipe checks of the data section."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towerlab.config import AugmentConfig, ConfigError
from towerlab.data.folder import prepare_images
from towerlab.data.images import decode, png_bytes
from towerlab.data.pipeline import Preprocessor, expand_positives, split_columns
from towerlab.data.text_augment import STOPWORDS, TokenAugment, captions_of, choose
from towerlab.data.tokenizer import EOT, UNK, Tokenizer, build_vocab, words

NO_GEOMETRY = dict(random_resized_crop=False, flip=False)


def _image():
    rng = np.random.default_rng(0)
    return png_bytes(rng.integers(0, 255, size=(8, 8, 3)).astype(np.uint8))


def test_colour_jitter_switch_and_strength():
    img = _image()
    plain = decode(img, 8)
    off = decode(img, 8, AugmentConfig(**NO_GEOMETRY), np.random.default_rng(0))
    zero = decode(img, 8, AugmentConfig(**NO_GEOMETRY, colour_jitter=True, colour_jitter_strength=0.0),
                  np.random.default_rng(0))
    assert np.array_equal(off, plain) and np.array_equal(zero, plain)
    weak = [decode(img, 8, AugmentConfig(**NO_GEOMETRY, colour_jitter=True, colour_jitter_strength=0.1),
                   np.random.default_rng(s)) for s in range(8)]
    strong = [decode(img, 8, AugmentConfig(**NO_GEOMETRY, colour_jitter=True, colour_jitter_strength=0.8),
                     np.random.default_rng(s)) for s in range(8)]
    dist = lambda xs: np.mean([np.abs(x - plain).mean() for x in xs])  # noqa: E731
    assert 0 < dist(weak) < dist(strong)


def test_caption_choice():
    caps = ["one", "two", "three"]
    assert choose(caps, 1, None, np.random.default_rng(0)) == ["one"]
    assert choose(caps, 1, AugmentConfig(caption_choice=False), np.random.default_rng(0)) == ["one"]
    picks = {choose(caps, 1, AugmentConfig(), np.random.default_rng(s))[0] for s in range(30)}
    assert picks == set(caps)
    two = choose(caps, 2, AugmentConfig(), np.random.default_rng(1))
    assert len(set(two)) == 2 and set(two) <= set(caps)
    assert sorted(choose(["a", "b"], 4, AugmentConfig(), np.random.default_rng(2))) == ["a", "a", "b", "b"]
    assert captions_of("x", None) == ["x"] and captions_of("x", '["p", "q"]') == ["p", "q"]
    assert captions_of("x", np.array(["p"], dtype=object)) == ["p"]


def test_token_masking_and_stopword_removal():
    text = "a photo of the red block on a table"
    vocab = build_vocab([text])
    tok = Tokenizer(vocab, 16, 64)
    ids = tok.encode_batch([text] * 50)
    same = TokenAugment(vocab, AugmentConfig())(ids, np.random.default_rng(0))
    assert np.array_equal(same, ids)
    masked = TokenAugment(vocab, AugmentConfig(token_mask=True, token_mask_prob=1.0))(ids, np.random.default_rng(0))
    n = len(words(text))
    assert (masked[:, :n] == UNK).all() and (masked[:, n] == EOT).all()
    half = TokenAugment(vocab, AugmentConfig(token_mask=True, token_mask_prob=0.3))(ids, np.random.default_rng(0))
    assert 0.2 < (half[:, :n] == UNK).mean() < 0.4  # 400 words, p = 0.3
    no_stop = TokenAugment(vocab, AugmentConfig(stopword_removal=True, stopword_prob=1.0))(ids[:1],
                                                                                           np.random.default_rng(0))
    assert np.array_equal(no_stop[0], tok.encode(" ".join(w for w in words(text) if w not in STOPWORDS)))
    only_stop = tok.encode_batch(["a the of"])
    kept = TokenAugment(vocab, AugmentConfig(stopword_removal=True, stopword_prob=1.0))(only_stop,
                                                                                        np.random.default_rng(0))
    assert np.array_equal(kept, only_stop)  # never removes every word


def test_k_captions_per_image_and_positives(image_folder, tmp_path):
    from towerlab import losses
    from towerlab.losses.base import positive_mask

    src = image_folder
    m, _ = prepare_images(src["images"], src["jsonl"], tmp_path / "out", shard_size=64)
    raw = split_columns(m, "train", m.columns)
    pre = Preprocessor(m.vocab, 16, 16, 512, AugmentConfig(), seed=0, captions_per_image=2)
    out = pre({k: v[:6] for k, v in raw.items()})
    assert out["text"].shape == (6, 2, 16) and out["image"].shape == (6, 3, 16, 16)
    tok = Tokenizer(m.vocab, 16, 512)
    for i in range(6):  # the two distinct captions of the record, in some order
        assert sorted(map(tuple, out["text"][i])) == sorted(tuple(tok.encode(c)) for c in raw["captions"][i])
    batch = expand_positives({k: torch.from_numpy(v) for k, v in out.items()})
    assert batch["image"].shape == (12, 3, 16, 16) and batch["text"].shape == (12, 16)
    assert torch.equal(batch["image"][0], batch["image"][1]) and torch.equal(batch["label"][:2], torch.from_numpy(out["id"][[0, 0]]))
    # decoupled softmax with the ids as labels == with the independent "same image" mask
    feats = {k: torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=1) for k in ("image", "text")}
    same_image = torch.arange(12)[:, None] // 2 == torch.arange(12)[None, :] // 2
    loss = losses.build("decoupled_softmax")
    kw = dict(logit_scale=torch.tensor(10.0, dtype=torch.float64), logit_bias=None, rank=0, world_size=1)
    by_ids = loss(feats, labels=batch["label"], **kw)["loss"]
    by_mask = loss(feats, pos_mask=same_image, **kw)["loss"]
    assert torch.allclose(by_ids, by_mask) and torch.equal(positive_mask(12, {"labels": batch["label"]}), same_image)
    one = Preprocessor(m.vocab, 16, 16, 512, None, captions_per_image=1)({k: v[:6] for k, v in raw.items()})
    assert one["text"].shape == (6, 16) and expand_positives(one) is one


@pytest.mark.parametrize("override,message", [
    ("data.augment.token_mask_prob=1.5", r"data.augment.token_mask_prob=1.5: must be in \[0, 1\]"),
    ("data.augment.colour_jitter_strength=-0.1", "colour_jitter_strength=-0.1"),
    ("data.captions_per_image=0", "captions_per_image=0: must be at least 1"),
    ("data.bad_shards=ignore", "data.bad_shards='ignore' is not allowed. Use one of: error, skip"),
    ("data.source=webdataset data.path=null", "data.source=webdataset needs data.path"),
])
def test_data_section_checks(repo_root, override, message):
    from towerlab.train.recipe import load_recipe

    with pytest.raises(ConfigError, match=message):
        load_recipe(repo_root / "recipes" / "debug.yaml", override.split())


def test_captions_per_image_only_for_multi_positive_losses(repo_root):
    from towerlab.train.dataset import captions_per_image
    from towerlab.train.recipe import load_recipe

    debug = repo_root / "recipes" / "debug.yaml"
    assert captions_per_image(load_recipe(debug, ["data.captions_per_image=3"])) == 1  # clip picks one
    for loss in ("decoupled_softmax", "sdm"):
        assert captions_per_image(load_recipe(debug, ["data.captions_per_image=3", f"loss.name={loss}"])) == 3


def test_recipe_and_manifest_must_agree(repo_root, image_folder, tmp_path):
    from towerlab.data import read_manifest
    from towerlab.train.dataset import check_prepared
    from towerlab.train.recipe import load_recipe

    src = image_folder
    debug = repo_root / "recipes" / "debug.yaml"
    prepare_images(src["images"], src["csv"], tmp_path / "wds", fmt="webdataset")
    m = read_manifest(tmp_path / "wds")
    with pytest.raises(ConfigError, match="data.source=parquet but .* holds webdataset shards"):
        check_prepared(load_recipe(debug, ["data.source=parquet"]), m)
    check_prepared(load_recipe(debug, ["data.source=webdataset"]), m)
    src["jsonl"].write_text("".join(f'{{"image": "{r["image"]}", "caption": "x"}}\n' for r in src["records"]))
    prepare_images(src["images"], src["jsonl"], tmp_path / "nolabel")
    with pytest.raises(ConfigError, match="evals.zeroshot is a zero-shot evaluator but .* has no class labels"):
        check_prepared(load_recipe(debug, ["data.source=parquet"]), read_manifest(tmp_path / "nolabel"))
    no_zeroshot = tmp_path / "retrieval_only.yaml"
    no_zeroshot.write_text(debug.read_text() + "\nevals: {retrieval: {type: retrieval}}\n")
    check_prepared(load_recipe(no_zeroshot, ["data.source=parquet"]), read_manifest(tmp_path / "nolabel"))
    prepare_images(src["images"], src["csv"], tmp_path / "noheld", heldout=0)
    with pytest.raises(ConfigError, match="no held-out records"):
        check_prepared(load_recipe(debug, ["data.source=parquet"]), read_manifest(tmp_path / "noheld"))
