"""A training shard that cannot be read when the driver reads the training split (not hashed at launch): one
ConfigError naming it and the fix, or with data.bad_shards=skip, left out with a warning and recorded in the
manifest. (test_faults.py runs the same fault through `towerlab train`.)"""

import pytest

from towerlab.config import ConfigError
from towerlab.data import read_manifest
from towerlab.data.folder import prepare_images
from towerlab.data.pipeline import read_train_tables


@pytest.fixture
def wds(tmp_path, make_image_folder):
    src = make_image_folder(tmp_path / "src", n=40)
    prepare_images(src["images"], src["csv"], tmp_path / "wds", fmt="webdataset", shard_size=10)
    return tmp_path / "wds"


def test_truncated_shard_is_named(wds):
    m = read_manifest(wds)
    bad = wds / m.data["splits"]["train"][1]["file"]
    bad.write_bytes(bad.read_bytes()[:600])  # inside the first member's bytes
    with pytest.raises(ConfigError) as e:
        read_train_tables(m)
    assert str(e.value).startswith(f"shard {bad} cannot be read (ReadError")
    assert "data.bad_shards=skip" in str(e.value)


def test_truncated_shard_is_skipped_and_recorded(wds, capsys):
    m = read_manifest(wds)
    entries, count = list(m.data["splits"]["train"]), m.count("train")
    bad = entries[1]
    (wds / bad["file"]).write_bytes((wds / bad["file"]).read_bytes()[:600])
    tables = read_train_tables(m, "skip")
    assert sum(t.num_rows for t in tables) == count - bad["rows"] == m.count("train")
    assert m.data["splits"]["train"] == [entries[0], *entries[2:]]
    assert m.skipped == [{"file": bad["file"], "rows": bad["rows"], "problem": m.skipped[0]["problem"]}]
    assert m.skipped[0]["problem"].startswith("cannot be read (ReadError")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: skipping shard {wds / bad['file']} ({bad['rows']} rows)")


def test_no_readable_shard_at_all(wds):
    m = read_manifest(wds)
    for e in m.data["splits"]["train"]:
        (wds / e["file"]).write_bytes(b"not a tar")
    with pytest.raises(ConfigError, match="no training shard of .* can be read"):
        read_train_tables(m, "skip")
