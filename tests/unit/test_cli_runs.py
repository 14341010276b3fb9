"""`towerlab eval` and `towerlab reproduce` on bad input: one line naming the thing and the fix, exit 2."""

import pytest

from towerlab.cli import main


@pytest.mark.parametrize("args, expected", [
    (["eval", "no-such-run"], "'no-such-run' is neither a directory (checkpoint or run) nor an MLflow run id"),
    (["eval", "0123456789abcdef0123456789abcdef", "--tracking-uri", "sqlite:///{tmp}/m.db"],
     "no MLflow run '0123456789abcdef0123456789abcdef'"),
    (["eval", "{tmp}"], "neither a checkpoint directory (with ds/) nor a run directory (with towerlab_run.json)"),
    (["reproduce", "0123456789abcdef0123456789abcdef", "--tracking-uri", "http://127.0.0.1:9"],
     "is unreachable"),
])
def test_bad_targets_are_one_line(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert expected in err and "Traceback" not in err


def test_run_dir_without_checkpoints(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "towerlab_run.json").write_text('{"mlflow_run_id": "x"}')
    assert main(["eval", str(tmp_path / "r")]) == 2
    assert "no checkpoint yet" in capsys.readouterr().err
