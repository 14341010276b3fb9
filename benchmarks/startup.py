"""Trial start-up: what a sweep trial spends before its first optimizer step, median over the trials of the
quickstart sweep, for this checkout and for a baseline revision, run the same way in the same run.

    .venv/bin/python benchmarks/startup.py [--baseline REV] [--trials 3] [--repeats 1]

Both sides run `towerlab sweep` on sweeps/quickstart.yaml, cut to `--trials` trials (its loss grid at one
temperature), 20 steps, no early stopping, one trial at a time, on the same prepared digits data and a local Ray;
the baseline runs the code of REV (a temporary git worktree) in this virtualenv. The sides alternate, `--repeats`
times each. A trial's start-up is measured the same way on both sides: from its MLflow run's start to its first
`train/loss` point (train.log_every=1, so the first step's). This leaves out the checks before the run opens, which
the current side's own `startup/` marks include (train/startup.py); those marks give the phases, medians printed.
Writes benchmarks/results/startup.json. Goal (issue 19): half of the baseline's median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _results import write_result

from mlflow import MlflowClient

from towerlab.train.startup import PHASES, PREFIX, durations

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(tmp: Path, name: str, data: Path, trials: int) -> Path:
    spec = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    spec["name"] = name
    spec["recipe"] = str(ROOT / "recipes" / "digits_clip.yaml")
    spec["overrides"] = [o for o in spec["overrides"] if not o.startswith(("train.steps", "train.log_every"))] + [
        "train.steps=20", "train.log_every=1", f"data.path={data}"]
    spec["space"]["loss.name"]["grid"] = spec["space"]["loss.name"]["grid"][:trials]
    spec["space"]["loss.temperature_init"] = {"grid": [0.07]}
    spec["scheduler"] = {"name": "none"}
    spec["max_concurrent_trials"] = 1
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def run_side(code: Path, sweep: Path, uri: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code / "platform")}
    out = subprocess.run([sys.executable, "-m", "towerlab.cli", "sweep", str(sweep), "--tracking-uri", uri],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"sweep {sweep.name} with the code of {code} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def trial_startups(uri: str, sweep: str) -> list[dict]:
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    [parent] = client.search_runs(exps, f"tags.`towerlab.sweep` = '{sweep}' and tags.`towerlab.role` = 'sweep'")
    out = []
    for kid in client.search_runs(exps, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
        first = min(client.get_metric_history(kid.info.run_id, "train/loss"), key=lambda m: m.step)
        marks = {k[len(PREFIX):-2]: v for k, v in kid.data.metrics.items() if k.startswith(PREFIX)}
        out.append({"run": kid.info.run_name, "startup_s": (first.timestamp - kid.info.start_time) / 1000,
                    "phases_s": durations(marks), "marks_s": marks})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="d25e8c4", help="git revision to compare with (default: before issue 19)")
    ap.add_argument("--trials", type=int, default=3, help="trials per sweep (the quickstart's losses, 1-3)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    from towerlab.data import prepare

    with tempfile.TemporaryDirectory(prefix="towerlab-startup-") as d:
        tmp = Path(d)
        data = tmp / "digits"
        prepare("digits", data)
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.baseline],
                       check=True)
        try:
            trials: dict[str, list[dict]] = {"baseline": [], "current": []}
            for r in range(args.repeats):
                for side, code in (("baseline", base), ("current", ROOT)):
                    name = f"startup-{side}-{r}"
                    uri = f"sqlite:///{tmp}/{side}.db"
                    run_side(code, sweep_file(tmp, name, data, args.trials), uri, tmp)
                    got = trial_startups(uri, name)
                    trials[side] += got
                    print(f"{side} #{r}: " + ", ".join(f"{t['startup_s']:.1f} s" for t in got), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)

    med = {s: statistics.median(t["startup_s"] for t in v) for s, v in trials.items()}
    phases = {p: statistics.median(t["phases_s"][p] for t in trials["current"] if p in t["phases_s"])
              for p in PHASES if any(p in t["phases_s"] for t in trials["current"])}
    ratio = med["current"] / med["baseline"]
    print(f"median trial start-up (MLflow run start -> first step): baseline {args.baseline} {med['baseline']:.1f} s, "
          f"current {med['current']:.1f} s, ratio {ratio:.2f} (goal <= 0.5)")
    print("current, median per phase (s): " + ", ".join(f"{p} {v:.1f}" for p, v in phases.items()))
    path = write_result({"benchmark": "startup", "baseline_rev": args.baseline, "trials_per_sweep": args.trials,
                         "repeats": args.repeats, "cpus": os.cpu_count(),
                         "load_avg_1m_at_end": os.getloadavg()[0], "median_startup_s": med, "ratio": ratio,
                         "goal_ratio": 0.5, "current_phase_median_s": phases, "trials": trials}, "startup")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
