"""ASHA vs the full grid over the same search space: trial-steps used, wall time, whether both pick the same best
configuration, and the median trial start-up time (from a trial's MLflow run start to its first logged step, minus
the time of those steps as measured by its own samples/s).

    .venv/bin/python benchmarks/sweep_efficiency.py [--steps 45]

Both sweeps run locally (a local Ray with its dashboard), one trial at a time, on the debug recipe. Writes
benchmarks/results/sweep_efficiency.json. Goal: ASHA uses at most 40% of the grid's trial-steps and picks the same
best configuration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _results import write_result

from mlflow import MlflowClient

from towerlab.sweep.load import load_sweep
from towerlab.sweep.run import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SPACE = """space:
  loss.name: {grid: [clip, siglip]}
  loss.temperature_init: {grid: [0.01, 0.05, 0.2, 0.5, 1.0]}
"""


def sweep_file(tmp: Path, name: str, steps: int, scheduler: str) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(f"""name: {name}
recipe: {ROOT}/recipes/debug.yaml
overrides: [train.steps={steps}, train.log_every=5, eval.every=5, train.checkpoint_every={steps}]
{SPACE}
scheduler: {scheduler}
metric: eval/zeroshot/top1
mode: max
""")
    return p


def measure(tmp: Path, name: str, steps: int, scheduler: str, uri: str) -> dict:
    path = sweep_file(tmp, name, steps, scheduler)
    t0 = time.perf_counter()
    summary = run_sweep(load_sweep(path), path, tracking_uri=uri)
    wall = time.perf_counter() - t0
    client = MlflowClient(uri)
    exp = client.get_run(summary.parent_run_id).info.experiment_id
    kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    trial_steps, startups = 0, []
    for k in kids:
        hist = sorted(client.get_metric_history(k.info.run_id, "train/loss"), key=lambda m: m.step)
        if not hist:
            continue
        trial_steps += hist[-1].step
        sps = client.get_metric_history(k.info.run_id, "train/samples_per_s")
        first_window = hist[0].step * 64 / sps[0].value if sps else 0.0
        startups.append((hist[0].timestamp - k.info.start_time) / 1000 - first_window)
    return {"wall_s": wall, "trial_steps": trial_steps, "trials": len(kids), "best_config": summary.best_config,
            "best_metric": summary.best_metric, "median_startup_s": statistics.median(startups) if startups else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=45)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="towerlab-sweep-bench-"))
    os.chdir(tmp)
    uri = f"sqlite:///{tmp}/mlruns.db"
    grid = measure(tmp, "grid", args.steps, "{name: none}", uri)
    asha = measure(tmp, "asha", args.steps, "{name: asha, grace_period: 5, reduction_factor: 3}", uri)
    ratio = asha["trial_steps"] / grid["trial_steps"]
    same = asha["best_config"] == grid["best_config"]
    # several configurations can tie at the best metric (e.g. 100% on the easy synthetic classes)
    same_metric = asha["best_metric"] == grid["best_metric"]
    result = {"grid": grid, "asha": asha, "trial_steps_ratio": ratio, "same_best_config": same,
              "same_best_metric": same_metric, "goal": 0.40,
              "steps_per_trial": args.steps, "cpus": os.cpu_count()}
    out = write_result(result, "sweep_efficiency")
    print(f"ASHA used {asha['trial_steps']} trial-steps vs the grid's {grid['trial_steps']}: ratio {ratio:.2f} "
          f"(goal <= 0.40); same best config: {same}, same best metric: {same_metric} ({asha['best_config']} vs {grid['best_config']}); wall "
          f"{asha['wall_s']:.0f} s vs {grid['wall_s']:.0f} s; median trial start-up "
          f"{asha['median_startup_s']:.1f} s -> {out}")


if __name__ == "__main__":
    main()
