"""CLIP's BPE (data/bpe.py) against its reference implementation, open_clip's SimpleTokenizer, token for token; the
text tower's pooling at <end_of_text>; the recipe checks of model.text.tokenizer; the unknown-word share of the word
vocabulary."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from towerlab.config import ConfigError
from towerlab.data import bpe
from towerlab.data.bpe import EOT, SOT, VOCAB_SIZE, ClipBPETokenizer, cache_dir, vocab_file
from towerlab.data.tokenizer import Tokenizer, build_vocab


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOWERLAB_CACHE", str(tmp_path_factory.getbasetemp() / "towerlab-cache"))


@pytest.fixture(scope="module")
def reference():
    """open_clip's tokenizer module, loaded by file path: `import open_clip` needs torchvision, which we do not
    install; the tokenizer module itself needs only ftfy, regex, numpy and torch."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


WORDS = ["a", "photo", "of", "the", "cat", "dog", "sitting", "on", "red", "car", "Giraffe", "zebra", "New", "York",
         "skyscraper", "pizza", "Margherita", "0", "1", "42", "2024", "3.14", "x-ray", "T-shirt", "e-mail",
         "it's", "DON'T", "we're", "they've", "I'm", "you'll", "he'd", "café", "naïve", "Ünïcödé", "東京", "タワー",
         "北京烤鸭", "Москва", "مرحبا", "שלום", "नमस्ते", "😀", "🐱‍👤", "🇫🇷", "&amp;", "&lt;b&gt;", "&quot;hi&quot;",
         "&amp;amp;", "cafÃ©", "Â£5", "https://example.com/a?b=c", "#hashtag", "@user", "$9.99", "100%", "C++",
         "...", "!!!", "?!", "(parenthesis)", "[bracket]", "{brace}", "snake_case", "CamelCaseWord", "ALLCAPS",
         "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis", "ß", "ﬁ", "Ⅻ",
         "①", "½", "x²", "℃", "\u00a0nbsp", "tab\there", "line\nbreak", "  spaced  ", "über-cool", "jalapeño",
         "résumé", "Ελλάδα", "한국어", "ไทย", "1st", "2nd", "3rd", "24/7", "a.m.", "U.S.A.", "l'été", "'quoted'",
         "\"double\"", "—dash—", "…", "•bullet", "~tilde~", "back\\slash", "<html>", "</w>", "a</w>b"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "a", "A photo of a cat.", "!", "!!", "a ! b", "0", "00000", "1 2 3 4 5 6 7 8 9 0"]
    while len(out) < n:
        k = rng.choice([1, 2, 3, 5, 8, 13, 30])  # some longer than any context length below: truncation
        sep = rng.choice([" ", " ", " ", "  ", ", ", "\t", "", "-"])
        out.append(sep.join(rng.choice(WORDS) for _ in range(k)))
    return out


@pytest.mark.parametrize("context_length", [77, 16, 5])
def test_ids_equal_open_clip_simple_tokenizer(reference, context_length):
    texts = captions(400)
    ours = ClipBPETokenizer(context_length).encode_batch(texts)
    theirs = reference.SimpleTokenizer(context_length=context_length)(texts).numpy()
    assert ours.shape == theirs.shape == (len(texts), context_length)
    mismatched = [(t, ours[i].tolist(), theirs[i].tolist()) for i, t in enumerate(texts)
                  if not np.array_equal(ours[i], theirs[i])]
    assert not mismatched, mismatched[:3]
    # and the module-level function OpenCLIP's training calls
    np.testing.assert_array_equal(ours[:20], reference.tokenize(texts[:20], context_length=context_length).numpy())


def test_layout_padding_truncation():
    tok = ClipBPETokenizer(8)
    short, long = tok.encode_batch(["a cat", "one two three four five six seven eight nine ten"])
    assert short[0] == SOT and short[3] == EOT and not short[4:].any()  # <sot> a cat <eot> 0 0 0 0
    assert long[0] == SOT and long[-1] == EOT and (long != 0).all()  # truncated: <eot> kept at the end
    assert tok.encode("").tolist() == [SOT, EOT, 0, 0, 0, 0, 0, 0]
    # a caption cannot plant an early <end_of_text> (where the text tower pools)
    planted = tok.encode("<end_of_text> a cat")
    assert (planted == EOT).sum() == 1 and planted.argmax() > 1
    assert tok.encode_batch(["x"]).dtype == np.int64


def test_vocabulary_comes_from_the_wheel_and_is_cached(tmp_path, monkeypatch):
    assert vocab_file().name == "bpe_simple_vocab_16e6.txt.gz"
    monkeypatch.setenv("TOWERLAB_CACHE", str(tmp_path / "c"))
    bpe.shared.cache_clear()  # another test may have loaded it in this process
    ClipBPETokenizer(16).encode("warm the cache")
    (cached,) = (tmp_path / "c" / "tokenizers").glob("clip_bpe-*.json")
    assert cache_dir() == tmp_path / "c" and cached.stat().st_size > 1_000_000
    assert not list((tmp_path / "c" / "tokenizers").glob(".*tmp*"))  # written atomically, nothing left behind
    cached.write_text("{not json")  # a corrupt cache is rebuilt, not an error
    bpe.shared.cache_clear()
    assert ClipBPETokenizer(16).encode("a cat").tolist()[:4] == [SOT, 320, 2368, EOT]


def test_pickles_without_the_loaded_tokenizer():
    import pickle

    tok = ClipBPETokenizer(16)
    tok.encode("load it")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._tok is None and clone.encode("a cat").tolist() == tok.encode("a cat").tolist()
    # ... and an unpickled copy (Ray Data unpickles the preprocessor for every task) does not read the
    # vocabulary again: the process's one loaded tokenizer serves it
    assert clone._tok is tok._tok


def test_text_tower_pools_at_the_end_of_text_token():
    from towerlab.config.schema import TextConfig
    from towerlab.models.towers import TextTower

    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=VOCAB_SIZE, context_length=8, width=16, layers=1, heads=2, tokenizer="clip_bpe")
    tower = TextTower(cfg, embed_dim=4).eval()
    # "a ! cat": "!" is id 0, inside the caption; counting non-zero ids would pool one position too early
    tokens = torch.tensor([[SOT, 320, 0, 2368, EOT, 0, 0, 0]])
    with torch.no_grad():
        x = tower.token_embedding(tokens) + tower.positional_embedding
        x = tower.ln_final(tower.transformer(x, tower.attn_mask.to(x.dtype)))
        expected = x[:, 4] @ tower.text_projection
        wrong = x[:, 3] @ tower.text_projection
        got = tower(tokens)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, wrong)
    # the word vocabulary keeps pooling at the last non-zero id (its EOT, 2, is not the largest id)
    words = TextTower(TextConfig(vocab_size=64, context_length=8, width=16, layers=1, heads=2), 4).eval()
    toks = torch.tensor([[40, 41, 2, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        x = words.token_embedding(toks) + words.positional_embedding
        x = words.ln_final(words.transformer(x, words.attn_mask.to(x.dtype)))
        torch.testing.assert_close(words(toks), x[:, 2] @ words.text_projection)


@pytest.mark.parametrize("overrides, message", [
    (["model.text.tokenizer=clip_bpe"], "model.text.vocab_size=49408"),
    (["model.text.tokenizer=bpe"], "model.text.tokenizer='bpe': use words or clip_bpe"),
    (["model.text.tokenizer=clip_bpe", "model.text.vocab_size=49408", "data.augment.token_mask=true"],
     "token_mask / stopword_removal"),
    (["model.text.tokenizer=clip_bpe", "model.text.vocab_size=49408", "model.text.pretrained=hf:x/y"],
     "reads its own tokenizer"),
])
def test_recipe_checks(overrides, message):
    from towerlab.train.recipe import load_recipe

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_recipe(None, overrides)


def test_clip_bpe_recipe_loads_and_the_preprocessor_uses_it():
    from towerlab.data.pipeline import Preprocessor
    from towerlab.train.recipe import load_recipe

    r = load_recipe(None, ["model.text.tokenizer=clip_bpe", "model.text.vocab_size=49408"])
    assert r.model.text.tokenizer == "clip_bpe"
    pre = Preprocessor([], 16, r.model.text.context_length, r.model.text.vocab_size, None,
                       tokenizer=r.model.text.tokenizer)
    assert isinstance(pre.tokenizer, ClipBPETokenizer)


def test_word_vocabulary_unknown_share_and_warning(capsys, tmp_path):
    from towerlab.data.shards import Manifest
    from towerlab.train.dataset import prompt_unknown_share
    from towerlab.train.recipe import load_recipe

    tok = Tokenizer(build_vocab(["a photo of a cat", "a photo of a dog"]), 16, 512)
    assert tok.unknown_share(["a photo of a cat"]) == 0.0
    assert tok.unknown_share(["a photo of a zebra", "an okapi"]) == pytest.approx(3 / 7)
    assert tok.unknown_share([""]) == 0.0

    data = {"splits": {"train": [], "heldout": []}, "vocab": build_vocab(["a photo of a cat"]),
            "classes": {"names": ["zebra", "okapi"],
                        "prompts": [["a zebra", "zebra"], ["an okapi", "okapi"]]}}
    manifest = Manifest(tmp_path, data)
    recipe = load_recipe(None, [])
    share = prompt_unknown_share(recipe, manifest)
    assert share == pytest.approx(5 / 6)  # all but "a"
    assert "83% of the zero-shot prompts' words are unknown" in capsys.readouterr().out
    data["vocab"] = build_vocab(["a zebra an okapi"])
    assert prompt_unknown_share(recipe, manifest) == 0.0 and "warning" not in capsys.readouterr().out
    bpe = load_recipe(None, ["model.text.tokenizer=clip_bpe", "model.text.vocab_size=49408"])
    assert prompt_unknown_share(bpe, manifest) is None
