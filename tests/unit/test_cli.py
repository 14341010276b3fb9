import json

from towerlab.cli import main


def test_recipes_ls(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    assert main(["recipes", "ls"]) == 0
    out = capsys.readouterr().out
    assert "digits_clip.yaml" in out and "debug.yaml" in out


def test_data_prepare(tmp_path, capsys):
    assert main(["data", "prepare", "synthetic", "--out", str(tmp_path / "syn"), "--size", "200", "--shards", "4"]) == 0
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 160, "heldout": 40} and len(manifest["splits"]["train"]) == 4
    assert "wrote synthetic" in capsys.readouterr().out


def test_unknown_source_is_one_line(tmp_path, capsys):
    assert main(["data", "prepare", "digitz", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown data source 'digitz'. Did you mean 'digits'?" in err.replace("\n", " ")
    assert not (tmp_path / "x").exists()


def test_error_text_is_not_markup(tmp_path, capsys):
    # error lines name things like ray[default] or a file called x[1].yaml: rich must print them, not eat them
    assert main(["train", str(tmp_path / "my[default].yaml")]) == 2
    assert "my[default].yaml" in capsys.readouterr().err.replace("\n", "")
