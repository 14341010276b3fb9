"""`towerlab data prepare images` on a real folder of PNG and JPEG files: shards in both formats, the manifest, the
validation report for every kind of bad input, duplicates, resuming, and reading through local paths and URIs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from towerlab.cli import main
from towerlab.config import ConfigError
from towerlab.data import read_manifest
from towerlab.data.folder import STATE, prepare_images
from towerlab.data.formats import read_rows
from towerlab.data.pipeline import split_columns


def _all_rows(m, split):
    return split_columns(m, split, ["id", "image", "caption", "captions", "label"])


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.parametrize("captions", ["csv", "jsonl"])
def test_prepare_both_formats(image_folder, tmp_path, fmt, captions):
    src = image_folder
    m, report = prepare_images(src["images"], src[captions], tmp_path / "out", fmt=fmt, shard_size=7, heldout=0.2)
    n = len(src["records"])
    assert report.valid == n and sum(report.problems.values()) == 0
    assert m.count("train") + m.count("heldout") == n and m.count("heldout") == round(0.2 * n)
    assert m.shard_format == fmt
    # every shard's checksum is the sha256 of its bytes, recomputed here independently
    for split, entries in m.data["splits"].items():
        assert [e["rows"] for e in entries][:-1] == [7] * (len(entries) - 1)
        for e in entries:
            data = (m.root / e["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
    m2 = read_manifest(tmp_path / "out", verify=True)
    # every image's bytes and captions arrive unchanged, each exactly once over both splits
    by_name = {r["image"]: r for r in src["records"]}
    got = {}
    for split in ("train", "heldout"):
        rows = _all_rows(m2, split)
        for img, caps, cap, label in zip(rows["image"], rows["captions"], rows["caption"], rows["label"]):
            caps = json.loads(caps) if isinstance(caps, str) else list(caps)
            digest = hashlib.sha256(img).hexdigest()
            assert digest not in got
            got[digest] = (caps, cap, label)
    assert len(got) == n
    names = sorted({r["label"] for r in src["records"]})
    for name, r in by_name.items():
        caps, cap, label = got[hashlib.sha256((src["images"] / name).read_bytes()).hexdigest()]
        assert caps == r["captions"] and cap == r["captions"][0] and names[label] == r["label"]
    assert m.classes["names"] == names and m.classes["prompts"][0] == [f"a photo of a {names[0]}."]
    # the first caption of each class is shared by 10 images: reported, not dropped
    assert report.duplicate_captions == 4 and report.multi_caption_records == n and report.max_captions == 2
    assert not (m.root / STATE).exists()


def test_bad_records_are_counted_or_strict(image_folder, tmp_path):
    src = image_folder
    (src["images"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src["images"] / "text.jpg").write_text("hello")
    shutil.copy(src["images"] / "img001.png", src["images"] / "copy.png")
    with open(src["csv"], "a") as f:
        f.write("broken.png,a broken image,,red\n")  # line 42
        f.write("text.jpg,not an image,,red\n")
        f.write("nowhere.png,a missing file,,red\n")
        f.write("img003.png,  ,,white\n")  # blank caption: adds nothing to img003, which keeps its two
        f.write("copy.png,   ,,green\n")  # exists, decodes, but no caption
        f.write('"copy2.png",the same bytes again,,green\n')
    shutil.copy(src["images"] / "img001.png", src["images"] / "copy2.png")
    m, r = prepare_images(src["images"], src["csv"], tmp_path / "out", shard_size=10)
    assert r.records == 45 and r.valid == 41
    assert r.problems == {"missing file": 1, "undecodable image": 2, "empty caption": 1, "outside --images": 0}
    assert r.examples[0] == "captions.csv line 42: undecodable image (broken.png)"
    assert any("line 44: missing file (nowhere.png)" in e for e in r.examples)
    assert r.duplicate_images == 1 and r.duplicate_image_examples == [["img001.png", "copy2.png"]]
    assert m.data["report"]["problems"] == r.problems
    # identical images never straddle the split
    splits = {s: {hashlib.sha256(b).hexdigest() for b in _all_rows(m, s)["image"]} for s in ("train", "heldout")}
    assert not splits["train"] & splits["heldout"]
    with pytest.raises(ConfigError, match=r"4 bad record\(s\).*line 42: undecodable image \(broken.png\).*--strict"):
        prepare_images(src["images"], src["csv"], tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("content,message", [
    ("image,text\na.png,x\n", "needs an 'image' column and a 'caption' column"),
    ("image,caption,label\nimg000.jpg,a,red\nimg000.jpg,b,blue\n", "has label 'blue' here but 'red' at line 2"),
    ("image,caption\n,a caption\n", "line 2: empty 'image' field"),
])
def test_bad_csv_is_one_clear_error(image_folder, tmp_path, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=message):
        prepare_images(image_folder["images"], bad, tmp_path / "out")


def test_bad_jsonl_and_arguments(image_folder, tmp_path):
    src = image_folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "img000.jpg", "caption": "ok"}\n{"image": oops}\n')
    with pytest.raises(ConfigError, match="bad.jsonl line 2: not JSON"):
        prepare_images(src["images"], bad, tmp_path / "o")
    bad.write_text('{"image": "img000.jpg", "captions": 3}\n')
    with pytest.raises(ConfigError, match="line 1: 'captions' must be a string or a list"):
        prepare_images(src["images"], bad, tmp_path / "o")
    with pytest.raises(ConfigError, match="no such file"):
        prepare_images(src["images"], tmp_path / "none.csv", tmp_path / "o")
    (tmp_path / "caps.txt").write_text("x")
    with pytest.raises(ConfigError, match="unknown type '.txt'"):
        prepare_images(src["images"], tmp_path / "caps.txt", tmp_path / "o")
    with pytest.raises(ConfigError, match="--images .*: no such directory"):
        prepare_images(tmp_path / "nope", src["csv"], tmp_path / "o")
    with pytest.raises(ConfigError, match="--format 'tfrecord'"):
        prepare_images(src["images"], src["csv"], tmp_path / "o", fmt="tfrecord")
    with pytest.raises(ConfigError, match="--shard-size 0"):
        prepare_images(src["images"], src["csv"], tmp_path / "o", shard_size=0)
    bad.write_text('{"image": "nothing.png", "caption": "x"}\n')
    with pytest.raises(ConfigError, match="no usable record.*missing file: 1"):
        prepare_images(src["images"], bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_prepare_images(image_folder, tmp_path, capsys):
    src = image_folder
    assert main(["data", "prepare", "images", "--images", str(src["images"]), "--captions", str(src["jsonl"]),
                 "--out", str(tmp_path / "wds"), "--format", "webdataset", "--shard-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "wrote webdataset shards" in out and "4 shards written" in out
    assert main(["data", "prepare", "images", "--out", str(tmp_path / "x")]) == 2
    assert "needs --images DIR and --captions" in capsys.readouterr().err
    assert main(["data", "prepare", "images", "--images", str(src["images"]), "--captions",
                 str(tmp_path / "missing.csv"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.csv: no such file" in err[0]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_interrupted_prepare_resumes(image_folder, tmp_path, fmt):
    src = image_folder
    done = []

    def stop_after_two(rel, reused):
        done.append(rel)
        if len(done) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_images(src["images"], src["csv"], out, fmt=fmt, shard_size=6, on_shard=stop_after_two)
    with pytest.raises(ConfigError, match="missing manifest.json"):  # nothing trainable until it finishes
        read_manifest(out)
    assert (out / STATE).exists() and not list(out.rglob(".*.tmp-*"))
    # a finished shard damaged while the run was down is rewritten, not trusted
    first, second = done
    (out / second).write_bytes(b"garbage")
    m, r = prepare_images(src["images"], src["csv"], out, fmt=fmt, shard_size=6)
    assert r.shards_reused == 1 and r.shards_written == len(m.files("train")) + len(m.files("heldout")) - 1
    ref, _ = prepare_images(src["images"], src["csv"], tmp_path / "ref", fmt=fmt, shard_size=6)
    assert m.fingerprint == ref.fingerprint and m.data["splits"] == ref.data["splits"]
    read_manifest(out, verify=True)
    # a complete dataset prepared again from the same inputs keeps every shard
    _, again = prepare_images(src["images"], src["csv"], out, fmt=fmt, shard_size=6)
    assert again.shards_written == 0
    # other inputs: shards rewritten, stale ones removed
    m3, r3 = prepare_images(src["images"], src["csv"], out, fmt=fmt, shard_size=20)
    assert r3.shards_reused == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(f.rsplit("/", 1)[1] for f in m3.files("train"))


def test_uri_paths_and_bad_shards(image_folder, tmp_path):
    import fsspec

    src = image_folder
    m, _ = prepare_images(src["images"], src["csv"], tmp_path / "out", shard_size=8)
    local = _all_rows(read_manifest(tmp_path / "out", verify=True), "train")
    via_file_uri = read_manifest(f"file://{tmp_path / 'out'}", verify=True)
    assert _all_rows(via_file_uri, "train")["image"] == local["image"]
    # a non-local filesystem (fsspec's in-memory one) through the same code path
    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path / "out"), "/towerlab-test/out", recursive=True)
    try:
        remote = read_manifest("memory://towerlab-test/out", verify=True)
        assert _all_rows(remote, "train")["id"] == local["id"]
        with mem.open(f"/towerlab-test/out/{m.data['splits']['train'][1]['file']}", "wb") as f:
            f.write(b"corrupt")
        with pytest.raises(ConfigError, match=r"shard memory://towerlab-test/out/train/part-00001.parquet does not "
                                              r"match its checksum.*data.bad_shards=skip"):
            read_manifest("memory://towerlab-test/out", verify=True)
        skipped = read_manifest("memory://towerlab-test/out", verify=True, bad_shards="skip")
        assert skipped.count("train") == m.count("train") - 8
        assert skipped.data["skipped"][0]["file"] == "train/part-00001.parquet"
        assert len(_all_rows(skipped, "train")["id"]) == skipped.count("train")
    finally:
        mem.rm("/towerlab-test", recursive=True)
    with pytest.raises(ConfigError, match="cannot open 'nosuchscheme://x'"):
        read_manifest("nosuchscheme://x")


def test_webdataset_shard_is_a_plain_tar(image_folder, tmp_path):
    """The tars are what OpenCLIP/LAION tooling reads: <key>.png|jpg + <key>.json, images byte-identical."""
    import tarfile

    src = image_folder
    m, _ = prepare_images(src["images"], src["csv"], tmp_path / "wds", fmt="webdataset", shard_size=100, heldout=0)
    with tarfile.open(m.files("train")[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000002.jpg", "000000002.json"] and names[2:4] == ["000000003.png", "000000003.json"]
        assert tar.extractfile("000000002.jpg").read() == (src["images"] / "img000.jpg").read_bytes()
        meta = json.loads(tar.extractfile("000000003.json").read())
    assert meta["captions"] == src["records"][1]["captions"] and meta["id"] == 3
    import pyarrow.fs as pafs

    rows = read_rows(pafs.LocalFileSystem(), m.files("train")[0], "webdataset", ["id", "caption"])
    assert rows["id"][:2] == [2, 3] and rows["caption"][0] == src["records"][0]["captions"][0]
