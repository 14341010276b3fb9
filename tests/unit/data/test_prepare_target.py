"""towerlab deletes only what it wrote: where `data prepare` (built-in sources and images) and the on-demand prepare
of `towerlab train` may write, and what they may replace there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from towerlab.cli import main
from towerlab.config import ConfigError
from towerlab.data import prepare, read_manifest
from towerlab.data.folder import prepare_images
from towerlab.data.shards import STATE
from towerlab.train.recipe import load_recipe


def _tree(root):
    """Every file under root with its bytes: what 'nothing touched' compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_directory_with_a_users_file_is_refused_untouched(tmp_path, capsys):
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "notes.txt").write_text("years of work")
    (home / "thesis" / "ch1.tex").write_text("\\chapter{1}")
    before = _tree(home)
    with pytest.raises(ConfigError, match=rf"{home} is not empty and holds no towerlab dataset.*choose an empty or "
                                          "new directory"):
        prepare("synthetic", home, shards=2, size=40)
    assert _tree(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no temporary sibling left either
    # the command: one `error:` line, exit 2, still nothing touched
    assert main(["data", "prepare", "digits", "--out", str(home)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(home) in err[0]
    assert _tree(home) == before
    # a file, not a directory
    with pytest.raises(ConfigError, match="notes.txt is a file, not a directory"):
        prepare("synthetic", home / "notes.txt", size=40)
    assert (home / "notes.txt").read_text() == "years of work"


def test_dot_is_refused(image_folder, tmp_path, monkeypatch, capsys):
    work = tmp_path / "project"
    work.mkdir()
    (work / "train.py").write_text("print('mine')")
    monkeypatch.chdir(work)
    assert main(["data", "prepare", "synthetic", "--size", "40", "--out", "."]) == 2
    assert f"{work} is not empty and holds no towerlab dataset" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="holds no towerlab dataset"):
        prepare_images(image_folder["images"], image_folder["csv"], ".")
    assert [p.name for p in work.iterdir()] == ["train.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "src"]


def test_empty_directory_and_dot_when_empty(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    m = prepare("synthetic", ".", shards=2, size=40)
    assert m.root == empty and read_manifest(empty, verify=True).count("train") == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # written in place: the cwd was not replaced


def test_reprepare_keeps_a_users_file(tmp_path):
    out = tmp_path / "syn"
    prepare("synthetic", out, shards=4, size=80)
    (out / "README.md").write_text("my notes on this dataset")
    (out / "train" / "extra.parquet").write_bytes(b"mine")
    (out / "train" / "part-00009.parquet").write_bytes(b"also mine, however it is named")
    m = prepare("synthetic", out, shards=2, size=60, seed=1)
    assert read_manifest(out, verify=True).fingerprint == m.fingerprint and m.count("train") == 48
    assert (out / "README.md").read_text() == "my notes on this dataset"
    assert (out / "train" / "extra.parquet").read_bytes() == b"mine"
    assert (out / "train" / "part-00009.parquet").read_bytes() == b"also mine, however it is named"
    # the two shards of the old plan that the new one does not write are gone; no state or temporary file remains
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "extra.parquet", "part-00000.parquet", "part-00001.parquet", "part-00009.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "heldout", "manifest.json", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_a_users_file_where_a_shard_would_go_is_refused(tmp_path):
    out = tmp_path / "syn"
    prepare("synthetic", out, shards=2, size=40)
    (out / "train" / "part-00002.parquet").write_bytes(b"mine")
    before = _tree(out)
    with pytest.raises(ConfigError, match="holds train/part-00002.parquet, which towerlab did not write"):
        prepare("synthetic", out, shards=4, size=40)
    assert _tree(out) == before


def test_doctored_manifest_cannot_delete_outside(tmp_path):
    out = tmp_path / "syn"
    prepare("synthetic", out, shards=2, size=40)
    (tmp_path / "precious.txt").write_text("keep")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"].append({"file": "../precious.txt", "rows": 0, "sha256": ""})
    (out / "manifest.json").write_text(json.dumps(manifest))
    prepare("synthetic", out, shards=1, size=40)
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_foreign_manifest_is_not_a_towerlab_dataset(tmp_path):
    out = tmp_path / "webapp"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    with pytest.raises(ConfigError, match="holds no towerlab dataset"):
        prepare("synthetic", out, size=40)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


def test_interrupted_prepare_can_be_finished(tmp_path, monkeypatch):
    """An interrupted rewrite leaves towerlab's state file, so the directory stays towerlab's and a retry works."""
    import towerlab.data.shards as shards

    out = tmp_path / "syn"
    prepare("synthetic", out, shards=3, size=60)
    (out / "keep.txt").write_text("mine")
    real = shards.pq.write_table
    calls = []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(shards.pq, "write_table", fail_second)
    with pytest.raises(KeyboardInterrupt):
        prepare("synthetic", out, shards=3, size=60, seed=2)
    monkeypatch.setattr(shards.pq, "write_table", real)
    assert (out / STATE).exists() and not (out / "manifest.json").exists()
    assert not list(out.rglob(".*.tmp-*"))
    m = prepare("synthetic", out, shards=2, size=60, seed=2)
    assert read_manifest(out, verify=True).fingerprint == m.fingerprint
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert (out / "keep.txt").read_text() == "mine" and not (out / STATE).exists()


def test_prepare_images_refuses_foreign_directory_and_keeps_users_files(image_folder, tmp_path):
    src = image_folder
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(ConfigError, match=r"--out .*photos is not empty and holds no towerlab dataset"):
        prepare_images(src["images"], src["csv"], foreign, shard_size=10)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]

    out = tmp_path / "out"
    prepare_images(src["images"], src["csv"], out, shard_size=6)
    (out / "notes.txt").write_text("mine")
    (out / "train" / "part-00099.parquet").write_bytes(b"mine too")
    # other inputs (shard size): every shard rewritten, the stale ones removed, the user's files kept
    m, r = prepare_images(src["images"], src["csv"], out, shard_size=20)
    assert r.shards_reused == 0
    read_manifest(out, verify=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "train" / "part-00099.parquet").read_bytes() == b"mine too"
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        [f.rsplit("/", 1)[1] for f in m.files("train")] + ["part-00099.parquet"])
    # the same inputs again: the finished shards are kept (resume), the user's files still there
    _, again = prepare_images(src["images"], src["csv"], out, shard_size=20)
    assert again.shards_written == 0 and (out / "notes.txt").read_text() == "mine"
    # a towerlab dataset of another kind (a built-in source) is towerlab's too: replaced, its parquet shards removed
    prepare("synthetic", tmp_path / "syn", shards=2, size=40)
    (tmp_path / "syn" / "mine.txt").write_text("x")
    m2, _ = prepare_images(src["images"], src["csv"], tmp_path / "syn", fmt="webdataset", shard_size=20)
    assert sorted(p.name for p in (tmp_path / "syn" / "train").iterdir()) == [
        f.rsplit("/", 1)[1] for f in m2.files("train")]
    assert (tmp_path / "syn" / "mine.txt").read_text() == "x"


def test_on_demand_prepare_refuses_non_empty_foreign_directory(tmp_path, monkeypatch):
    """`towerlab train` prepares a built-in source into data.path on first use: a typo naming an existing
    directory must not wipe it."""
    from towerlab.train.dataset import ensure_data

    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "paper.pdf").write_bytes(b"%PDF")
    recipe = load_recipe(_recipe_path(), ["data.source=synthetic", "data.synthetic_size=64", f"data.path={docs}"])
    with pytest.raises(ConfigError, match=rf"^data.path {docs} is not empty and holds no towerlab dataset"):
        ensure_data(recipe)
    assert [p.name for p in docs.iterdir()] == ["paper.pdf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]
    # an empty (or new) directory is prepared on demand
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    recipe = load_recipe(_recipe_path(), ["data.source=synthetic", "data.synthetic_size=256", f"data.path={fresh}"])
    assert ensure_data(recipe).count("train") > 0


def _recipe_path() -> str:
    return str(Path(__file__).resolve().parents[3] / "recipes" / "debug.yaml")
