"""Foreign WebDataset shards read in place (data/foreign.py), on real tars in img2dataset's layout: listing
(directory, brace pattern, list, an fsspec filesystem), sample counts (stats files, data.num_samples, a count),
reading with dirty samples and an unreadable shard, the preprocessor's skipping, and the run's data checks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from towerlab.config import ConfigError
from towerlab.data.foreign import ShardError, is_foreign, list_shards, read_shard, shard_manifest
from towerlab.train.recipe import load_recipe

KEYS = ["jpg", "jpeg", "png", "webp"]
BPE = ["model.text.tokenizer=clip_bpe", "model.text.vocab_size=49408"]


@pytest.fixture
def shards(tmp_path, make_wds_shards):
    return make_wds_shards(tmp_path / "laion", shards=3, per_shard=6)


def recipe(*overrides):
    return load_recipe(None, ["data.source=webdataset", *BPE, "evals={}", "data.global_batch=4", "train.workers=1",
                              *overrides])


def test_directory_listing_sorted_with_sizes(shards):
    fs, files, sizes, listed = list_shards([str(shards["root"])])
    assert isinstance(fs, pafs.LocalFileSystem)
    assert files == [str(p) for p in shards["tars"]]  # the .parquet and _stats.json beside them are not shards
    assert all(sizes[f] == shards["root"].joinpath(f.rsplit("/", 1)[1]).stat().st_size for f in files)
    assert listed == [str(shards["root"])]


def test_brace_pattern_and_list_are_not_opened(shards, tmp_path):
    root = shards["root"]
    # names that do not exist are listed without a stat: the driver never touches the shards themselves
    fs, files, sizes, _ = list_shards([f"{root}/{{00000..00009}}.tar"])
    assert files == [f"{root}/{i:05d}.tar" for i in range(10)] and set(sizes.values()) == {None}
    _, files, _, _ = list_shards([f"{root}/00001.tar", f"{root}/{{00000..00000}}.tar"])
    assert files == [f"{root}/00001.tar", f"{root}/00000.tar"]
    with pytest.raises(ConfigError, match="name 1 shard\\(s\\) twice"):
        list_shards([f"{root}/00001.tar", f"{root}/00001.tar"])
    with pytest.raises(ConfigError, match="mixes filesystems"):
        list_shards([f"{root}/00001.tar", "memory://bucket/00002.tar"])
    with pytest.raises(ConfigError, match="no such directory"):
        list_shards([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .tar shards in it"):
        list_shards([str(tmp_path / "empty")])


def test_sample_count_from_stats_files(shards, capsys):
    d = recipe(f"data.path={shards['root']}").data
    m = shard_manifest(d)
    out = capsys.readouterr().out
    assert m.count("train") == 4 * 6  # every tar has a stats file, the truncated one too (its download "succeeded")
    assert "4 WebDataset shard(s), 24 samples (from img2dataset's _stats.json files)" in out
    assert m.data["foreign"] and m.data["count_source"] == "img2dataset's _stats.json files"
    assert [e["file"] for e in m.data["splits"]["train"]] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert m.files("train") == [str(p) for p in shards["tars"]] and m.vocab == [] and m.classes == {}
    # the fingerprint names the shards (and listed sizes), not their contents
    assert m.fingerprint == shard_manifest(d, say=lambda s: None).fingerprint
    for suffix in (".tar", "_stats.json"):
        (shards["root"] / f"00002{suffix}").rename(shards["root"] / f"00009{suffix}")
    assert shard_manifest(d, say=lambda s: None).fingerprint != m.fingerprint


def test_sample_count_from_num_samples_else_counted(shards, capsys):
    (shards["root"] / "00001_stats.json").unlink()  # stats beside some tars only: not used
    m = shard_manifest(recipe(f"data.path={shards['root']}", "data.num_samples=1000").data)
    assert m.count("train") == 1000 and "(from data.num_samples)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"shard .*00003.tar cannot be read .*data.bad_shards=skip"):
        shard_manifest(recipe(f"data.path={shards['root']}").data)
    m = shard_manifest(recipe(f"data.path={shards['root']}", "data.bad_shards=skip").data)
    out = capsys.readouterr().out
    assert "counting the samples of 4 shard(s)" in out and "set data.num_samples to skip it" in out
    assert m.count("train") == 3 * 6 and "(from a count of the shards' members)" in out
    assert m.data["splits"]["train"][0]["rows"] == 6


def test_read_shard_rows_dirty_samples_and_captions_from_json(shards):
    fs = pafs.LocalFileSystem()
    first = list(read_shard(fs, str(shards["tars"][0]), KEYS, "txt"))
    assert len(first) == 6
    problems = {i: r["problem"] for i, r in enumerate(first) if r["problem"]}
    assert problems == {2: "no caption"}  # the corrupt image is only found when decoding (the preprocessor)
    assert first[0]["caption"].endswith("photo 000000000") and first[0]["image"][:2] == b"\xff\xd8"
    assert first[0]["label"] == -1 and first[2]["image"] == b""
    last = list(read_shard(fs, str(shards["tars"][2]), KEYS, "txt"))  # no .txt members: captions from the json
    assert [r["problem"] for r in last] == [""] * 6 and last[0]["caption"].endswith("photo 000020000")
    assert last[0]["image"].startswith(b"\x89PNG") is False  # shard 2 is jpg (odd shards png)
    png = list(read_shard(fs, str(shards["tars"][1]), KEYS, "txt"))
    assert png[0]["image"].startswith(b"\x89PNG")
    # custom keys: a caption member that does not exist falls back to the json's caption
    alt = list(read_shard(fs, str(shards["tars"][0]), ["png"], "caption_txt"))
    assert {r["problem"] for r in alt} == {"no image"}


def test_unreadable_shard_is_one_line_or_skipped(shards):
    fs = pafs.LocalFileSystem()
    bad = str(shards["bad_tar"])
    with pytest.raises(ShardError) as e:
        list(read_shard(fs, bad, KEYS, "txt"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"shard {bad} cannot be read (ReadError")
    assert msg.endswith("set data.bad_shards=skip to train without it")
    rows = list(read_shard(fs, bad, KEYS, "txt", bad_shards="skip"))
    assert rows[-1]["problem"].startswith(f"shard {bad} cannot be read") and rows[-1]["image"] == b""
    assert all(r["problem"] in ("", "no caption") for r in rows[:-1])  # the samples before the damage are kept


def test_preprocessor_drops_and_counts_dirty_samples(shards):
    from towerlab.data.pipeline import Preprocessor

    fs = pafs.LocalFileSystem()
    rows = [r for t in shards["tars"] for r in read_shard(fs, str(t), KEYS, "txt", bad_shards="skip")]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    pre = Preprocessor([], 16, 16, 49408, None, tokenizer="clip_bpe")
    out = pre(batch)
    n = len(out["image"])
    # the good samples of 3 shards, and of the truncated copy of shard 0 the one good sample before the damage (its
    # other two are the corrupt image and the sample without a caption)
    assert n == shards["good"] + 1
    assert out["image"].shape == (n, 3, 16, 16) and out["text"].shape == (n, 16) and out["label"].shape == (n,)
    assert out["skipped"].sum() == len(rows) - n and out["skipped"][0] == len(rows) - n
    assert (out["text"][:, 0] == 49406).all()
    # a batch of nothing usable: empty arrays of the right shapes, not a crash
    empty = pre({"image": [b"", b"garbage"], "caption": ["", "x"], "label": [-1, -1], "problem": ["no image", ""]})
    assert empty["image"].shape == (0, 3, 16, 16) and empty["text"].shape == (0, 16)


def test_memory_filesystem_through_fsspec(shards):
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.put(str(shards["root"]), "/towerlab-wds/laion", recursive=True)
    try:
        d = recipe("data.path=memory://towerlab-wds/laion/{00000..00002}.tar").data
        assert is_foreign(d)
        m = shard_manifest(d, say=lambda s: None)
        assert m.count("train") == 18  # stats files read through the same filesystem
        rows = list(read_shard(m.loc.fs, m.files("train")[1], KEYS, "txt"))
        assert len(rows) == 6 and not any(r["problem"] for r in rows)
    finally:
        mem.rm("/towerlab-wds", recursive=True)


def test_a_prepared_webdataset_directory_still_uses_its_manifest(tmp_path, image_folder):
    from towerlab.data.folder import prepare_images

    prepare_images(image_folder["images"], image_folder["csv"], tmp_path / "mine", fmt="webdataset", shard_size=8)
    assert not is_foreign(recipe(f"data.path={tmp_path / 'mine'}").data)
    assert is_foreign(recipe(f"data.path={tmp_path / 'mine' / 'train'}").data)  # bare tars: read as foreign
    assert not is_foreign(load_recipe(None, ["data.source=parquet", f"data.path={tmp_path / 'mine'}"]).data)
    assert is_foreign(load_recipe(None, ["data.source=parquet", f"data.path={tmp_path}"]).data)  # no manifest.json


def test_run_data_checks(shards, capsys):
    from towerlab.train.dataset import ensure_data

    root = shards["root"]
    m = ensure_data(recipe(f"data.path={root}"))
    assert m.count("train") == 24
    with pytest.raises(ConfigError, match="has no word vocabulary: set model.text.tokenizer=clip_bpe"):
        ensure_data(load_recipe(None, ["data.source=webdataset", f"data.path={root}", "evals={}",
                                       "data.global_batch=4", "train.workers=1"]))
    with pytest.raises(ConfigError, match=r"evals.zeroshot.data=heldout: foreign shards have no "
                                          r"held-out split.*evals=\{\}"):
        ensure_data(load_recipe(None, ["data.source=webdataset", f"data.path={root}", *BPE, "data.global_batch=4",
                                       "train.workers=1"]))
    (root / "00000_stats.json").unlink()
    with pytest.raises(ConfigError, match="lower data.global_batch"):
        ensure_data(recipe(f"data.path={root}", "data.num_samples=2"))


@pytest.mark.parametrize("overrides, message", [
    (["data.source=webdataset"], "needs data.path: a directory from `towerlab data prepare`, a directory of "
                                 "WebDataset .tar shards"),
    (["data.source=synthetic", "data.paths=[/b]"], "data.paths is for data.source=webdataset or parquet"),
    (["data.source=webdataset", "data.path=/a", "data.paths=[/b]"], "both set"),
    (["data.num_samples=0"], "data.num_samples=0: must be at least 1"),
    (["data.image_keys=[]"], "data.image_keys=\\[\\]: give member suffixes"),
    (["data.caption_key=.txt"], "data.caption_key='.txt'"),
    (["data.path=/x/{00000..00002", "data.source=webdataset", *BPE, "evals={}"], "not a valid brace pattern"),
])
def test_recipe_checks(overrides, message):
    from towerlab.train.dataset import ensure_data

    with pytest.raises(ConfigError, match=message.replace("`", ".")):
        ensure_data(load_recipe(None, overrides))


def test_evals_override_empty_trains_without_evaluators():
    assert load_recipe(None, ["evals={}"]).evals == {}
    assert set(load_recipe(None, []).evals) == {"zeroshot", "retrieval", "geometry"}


def test_stats_file_layout_matches_img2dataset(shards):
    stats = json.loads((shards["root"] / "00000_stats.json").read_text())
    assert stats["successes"] == 6 and (shards["root"] / "00000.parquet").is_file()
    assert np.isfinite(stats["duration"])


def test_evals_override_empty_also_clears_a_recipe_files_evaluators(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("evals:\n  mine: {type: retrieval}\n")
    assert set(load_recipe(f, []).evals) == {"mine"}
    assert load_recipe(f, ["evals={}"]).evals == {}


def write_parquet_shards(root, hf: bool = False) -> dict:
    """Image-bytes Parquet as img2dataset writes it (`--output_format parquet`: key, url, caption, status, jpg) or,
    with `hf`, as Hugging Face datasets do (an `image` struct {bytes, path} and a `text` column); the first file
    has a row without a caption and a row without an image; a third file is not Parquet at all."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = 0
    for s in range(2):
        rows = []
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, size=(12, 12, 3)).astype(np.uint8)).save(buf, format="JPEG")
            image, caption = buf.getvalue(), f"a noisy picture number {s}-{i}"
            if s == 0 and i == 1:
                caption = "  "
            elif s == 0 and i == 2:
                image = None
            else:
                good += 1
            key = f"{s:05d}{i:04d}"
            if hf:
                rows.append({"image": None if image is None else {"bytes": image, "path": f"{key}.jpg"},
                             "text": caption})
            else:
                rows.append({"key": key, "url": f"http://127.0.0.1/{key}.jpg", "caption": caption,
                             "status": "success", "jpg": image})
        pq.write_table(pa.Table.from_pylist(rows), root / f"{s:05d}.parquet")
    (root / "00002.parquet").write_bytes(b"PAR1 this is not parquet")
    return {"root": root, "good": good}


@pytest.mark.parametrize("hf", [False, True])
def test_image_bytes_parquet(tmp_path, hf, capsys):
    from towerlab.data.foreign import read_parquet_shard
    from towerlab.data.pipeline import Preprocessor
    from towerlab.train.dataset import ensure_data

    src = write_parquet_shards(tmp_path / "pq", hf=hf)
    r = load_recipe(None, ["data.source=parquet", f"data.path={src['root']}/{{00000..00001}}.parquet", *BPE,
                           "evals={}", "data.global_batch=4", "train.workers=1"])
    assert is_foreign(r.data)
    m = ensure_data(r)  # no stats files: counted from the footers
    assert m.count("train") == 10 and "2 Parquet shard(s), 10 samples (from a count" in capsys.readouterr().out
    assert m.data["keys"] == ({"image": "image", "caption": "text"} if hf else {"image": "jpg", "caption": "caption"})
    fs = m.loc.fs
    rows = [row for f in m.files("train") for row in read_parquet_shard(fs, f, **_cols(m))]
    assert [row["problem"] for row in rows[:3]] == ["", "no caption", "no image"] and len(rows) == 10
    batch = {k: [row[k] for row in rows] for k in rows[0]}
    out = Preprocessor([], 16, 16, 49408, None, tokenizer="clip_bpe")(batch)
    assert len(out["image"]) == src["good"] and out["skipped"].sum() == 2

    bad = str(src["root"] / "00002.parquet")
    with pytest.raises(ShardError, match=r"^shard .*00002.parquet cannot be read .*data.bad_shards=skip"):
        list(read_parquet_shard(fs, bad, **_cols(m)))
    (row,) = read_parquet_shard(fs, bad, **_cols(m), bad_shards="skip")
    assert row["problem"].startswith(f"shard {bad} cannot be read")
    # the directory: the unreadable file is listed and its footer cannot be counted
    r = load_recipe(None, ["data.source=parquet", f"data.path={src['root']}", *BPE, "evals={}",
                           "data.global_batch=4", "train.workers=1"])
    with pytest.raises(ConfigError, match="00002.parquet cannot be read"):
        ensure_data(r)


def _cols(m) -> dict:
    return {"image_column": m.data["keys"]["image"], "caption_column": m.data["keys"]["caption"]}


def test_parquet_columns_named_or_refused(tmp_path):
    src = write_parquet_shards(tmp_path / "pq")
    base = ["data.source=parquet", f"data.path={src['root']}/00000.parquet", *BPE, "evals={}", "train.workers=1",
            "data.global_batch=2"]
    m = shard_manifest(load_recipe(None, [*base, "data.caption_column=url"]).data, say=lambda s: None)
    assert m.data["keys"] == {"image": "jpg", "caption": "url"}
    with pytest.raises(ConfigError, match=r"data.image_column: no column 'pixels' in .*00000.parquet \(columns: key, "
                                          r"url, caption, status, jpg\): set data.image_column"):
        shard_manifest(load_recipe(None, [*base, "data.image_column=pixels"]).data, say=lambda s: None)


def test_resampled_draws_shards_with_replacement_to_cover_an_epoch(shards):
    from towerlab.data.foreign import resample

    d = recipe(f"data.path={shards['root']}", "data.resampled=true").data
    m = shard_manifest(d, say=lambda s: None)  # 4 shards, 24 samples: 6 per shard
    draws = resample(m, None, seed=0)
    assert len(draws) == 4 and set(draws) <= set(m.files("train"))
    many = resample(m, 600, seed=0)
    assert len(many) == 100 and len(set(many)) == 4  # with replacement: every shard, many times
    assert many == resample(m, 600, seed=0) and many != resample(m, 600, seed=1)
    with pytest.raises(ConfigError, match="data.resampled=true draws foreign shards"):
        load_recipe(None, ["data.resampled=true"])
