import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from towerlab.config import ConfigError, Recipe
from towerlab.data import prepare, read_manifest
from towerlab.data.images import decode
from towerlab.data.pipeline import load_split, preprocessor
from towerlab.data.shards import sha256_file
from towerlab.data.tokenizer import EOT, UNK, Tokenizer, build_vocab


def test_digits_shards_and_manifest(digits_dir):
    m = read_manifest(digits_dir, verify=True)
    assert m.count("train") + m.count("heldout") == 1797
    assert len(m.files("train")) >= 4
    rows = sum(pq.read_metadata(f).num_rows for f in m.files("train"))
    assert rows == m.count("train")
    train_ids = set(pq.ParquetDataset(m.files("train")).read(columns=["id"])["id"].to_pylist())
    held_ids = set(pq.ParquetDataset(m.files("heldout")).read(columns=["id"])["id"].to_pylist())
    assert not train_ids & held_ids, "held-out digits leak into training"
    assert len(train_ids | held_ids) == 1797
    t = pq.read_table(m.files("train")[0])
    assert t.column_names == ["id", "image", "caption", "label"]
    assert t["image"][0].as_py()[:8] == b"\x89PNG\r\n\x1a\n"
    for entry in m.data["splits"]["train"]:
        assert sha256_file(digits_dir / entry["file"]) == entry["sha256"]


def test_captions_have_several_templates_per_class(digits_dir):
    m = read_manifest(digits_dir)
    t = pq.ParquetDataset(m.files("train")).read(columns=["caption", "label"]).to_pydict()
    sevens = {c for c, label in zip(t["caption"], t["label"]) if label == 7}
    assert len(sevens) >= 4 and "a handwritten seven" in sevens and "the digit 7 written by hand" in sevens


def test_prepare_is_atomic_and_leaves_no_temp(tmp_path):
    out = tmp_path / "syn"
    prepare("synthetic", out, shards=3, size=100)
    prepare("synthetic", out, shards=5, size=100)  # replaces in place
    assert len(read_manifest(out).files("train")) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_corrupt_and_missing_shards_are_named(tmp_path):
    out = tmp_path / "syn"
    m = prepare("synthetic", out, shards=2, size=50)
    shard = m.files("train")[1]
    with open(shard, "r+b") as f:
        f.seek(10)
        f.write(b"garbage")
    with pytest.raises(ConfigError, match="part-00001.parquet does not match its checksum"):
        read_manifest(out, verify=True)
    (out / "train" / "part-00001.parquet").unlink()
    with pytest.raises(ConfigError, match="part-00001.parquet is missing"):
        read_manifest(out, verify=True)
    with pytest.raises(ConfigError, match="towerlab data prepare"):
        read_manifest(tmp_path / "nothing")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        read_manifest(out)


def test_tokenizer_roundtrip():
    vocab = build_vocab(["a handwritten seven", "the digit 7", "a seven"])
    assert vocab[:3] == ["<pad>", "<unk>", "<eot>"] and vocab[3] in ("a", "seven")
    tok = Tokenizer(vocab, context_length=6, vocab_size=64)
    ids = tok.encode("A handwritten SEVEN, zebra!")
    words = [vocab[i] for i in ids[:3]]
    assert words == ["a", "handwritten", "seven"] and ids[3] == UNK and ids[4] == EOT and ids[5] == 0
    long = tok.encode("a " * 20)
    assert long[-1] == EOT and len(long) == 6


def test_decode_and_augment_shapes():
    from towerlab.config import AugmentConfig
    from towerlab.data.images import png_bytes

    img = png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    plain = decode(img, 16)
    assert plain.shape == (3, 16, 16) and plain.dtype == np.float32
    assert -1.0 <= plain.min() and plain.max() <= 1.0
    aug = decode(img, 16, AugmentConfig(crop_scale_min=0.3, flip=True), np.random.default_rng(1))
    assert aug.shape == (3, 16, 16) and not np.allclose(aug, plain)


def test_eval_split_preprocessing(digits_dir):
    m = read_manifest(digits_dir)
    pre = preprocessor(Recipe(), m, train=False)
    d = load_split(m, "heldout", pre)
    n = m.count("heldout")
    assert d["image"].shape == (n, 3, 16, 16) and d["text"].shape == (n, 16) and d["label"].shape == (n,)
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert len(manifest["classes"]["prompts"]) == 10
