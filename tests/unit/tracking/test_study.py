"""A sweep's study read from a real MLflow store: configurations grouped by the config tag, failed runs and runs
without the metric excluded and counted, the early-stop mark (a KILLED run still rising below the best is marked, a
KILLED flat one is not), `towerlab compare --sweep`'s table and comparison.json on the parent run."""

from __future__ import annotations

import json

import pytest

from towerlab.cli import main
from towerlab.tracking import study

from sweep_store_testing import CONFIGS, sweep_store  # noqa: F401  (the fixture, shared with the report test)

pytestmark = pytest.mark.usefixtures("restore_signals")


def test_configurations_are_grouped_and_ranked(sweep_store):
    s = study.load(sweep_store["uri"], "study")
    assert [g.key for g in s.configs] == ["clip-0.07-32", "siglip-0.07-32", "clip-0.2-128", "clip-0.2-32",
                                          "siglip-0.2-128", "dcl-0.2-128"]
    for g in s.configs:
        assert sorted(r.value for r in g.runs) == pytest.approx(sorted(CONFIGS[g.key][3]))
    assert s.excluded == {"failed": 1, "without the metric": 1, "still running": 0}
    assert s.configs[1].stat.mark == "tied with best" and s.configs[2].stat.mark == "worse"
    assert s.configs[0].label == "data.global_batch=32, loss.name=clip, loss.temperature_init=0.07"


def test_early_stop_marks_a_rising_killed_run_not_a_flat_one(sweep_store):
    """siglip-0.2-128 is cut rising; dcl-0.2-128 is cut flat; clip-0.2-128 rises but was KILLED at its last step."""
    s = study.load(sweep_store["uri"], "study")
    marks = {g.key: g.cut_climbing for g in s.configs}
    assert marks == {"clip-0.07-32": False, "siglip-0.07-32": False, "clip-0.2-32": False,
                     "siglip-0.2-128": True, "dcl-0.2-128": False, "clip-0.2-128": False}


def test_an_older_sweep_compares_run_by_run(sweep_store):
    s = study.load(sweep_store["uri"], "old")
    assert [(g.label, g.stat.n, g.stat.mark) for g in s.configs] == [("loss.name=clip #2", 1, "best"),
                                                                     ("loss.name=clip", 1, "not tested")]
    assert s.result.tested == 0


def test_climbing():
    assert study.climbing([(10, 0.2), (20, 0.4)], "max")
    assert not study.climbing([(10, 0.3), (20, 0.31), (30, 0.3)], "max")
    assert study.climbing([(10, 0.1), (20, 0.3), (30, 0.29)], "max")  # one noisy eval on a rising slope
    assert study.climbing([(10, 2.0), (20, 1.5)], "min")
    assert not study.climbing([(10, 0.5)], "max")


def test_compare_sweep_prints_the_statistics_and_logs_them(sweep_store, capsys, monkeypatch):
    monkeypatch.chdir(sweep_store["tmp"])
    assert main(["compare", "--sweep", "study", "--tracking-uri", sweep_store["uri"]]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps cells: compare words, not lines
    assert "Welch's t, Holm-corrected over 15 pairs, alpha 0.05" in out
    assert "final (last logged) value" in out
    assert "tied p=0.51" in out and "worse p=" in out and "not significantly different from the best (1)" in out
    assert "stopped early while still improving" in out
    assert "1 failed, 1 without the metric" in out
    client = sweep_store["client"]
    data = json.loads(client.download_artifacts(sweep_store["parent"], "comparison.json", str(sweep_store["tmp"])) and
                      (sweep_store["tmp"] / "comparison.json").read_text())
    assert [c["config"] for c in data["configs"]][:3] == ["clip-0.07-32", "siglip-0.07-32", "clip-0.2-128"]
    best = data["configs"][0]
    assert best["n"] == 3 and best["mean"] == pytest.approx(0.91) and len(best["ci95"]) == 2
    assert data["pairs_tested"] == 15 and len(data["pairs"]) == 15
    assert data["tied_with_best"] == [data["configs"][1]["label"]]


def test_compare_run_ids_still_works(sweep_store, capsys, monkeypatch):
    monkeypatch.chdir(sweep_store["tmp"])
    ids = sweep_store["runs"]["clip-0.07-32"][:2]
    assert main(["compare", *ids, "--tracking-uri", sweep_store["uri"]]) == 0
    out = capsys.readouterr().out
    assert "clip t=0.07 b=32 s=0" in out and "clip t=0.07 b=32 s=1" in out
