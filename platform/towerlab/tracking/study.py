"""A sweep read from MLflow as a study: its trials grouped by configuration (the `towerlab.config` tag; runs of older
sweeps, which lack it, are each their own configuration), each run's final metric and metric history, the statistics
of tracking/stats.py over the groups, and the early-stop marks: a trial the scheduler stopped while its metric was
still improving and below the best configuration at the same step, whose rank is therefore not a conclusion.

`towerlab compare --sweep` prints it, `towerlab report` draws it, and both log `to_json` to the sweep's parent run."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from towerlab.tracking import stats, tags as T

VALUE_NOTE = "a run's value is the final (last logged) value of the metric"
CUT_NOTE = "stopped early while still improving: its ranking is not a conclusion"


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    experiment_id: str
    seed: str | None
    history: list[tuple[int, float]]  # the sweep metric by step (or samples seen: Study.x), in order
    metrics: dict[str, float]  # every metric's latest value (geometry, train/loss, ...)
    killed_by_scheduler: bool = False
    cut_climbing: bool = False

    @property
    def value(self) -> float:
        return self.history[-1][1]


@dataclass
class ConfigGroup:
    key: str
    label: str
    params: dict[str, str]  # the recipe's flattened params, without the seed
    runs: list[RunRecord] = field(default_factory=list)
    stat: stats.ConfigStat | None = None

    @property
    def cut_climbing(self) -> bool:
        return any(r.cut_climbing for r in self.runs)

    def curve(self) -> list[tuple[int, float]]:
        """The sweep metric's mean over seeds at each step or sample count (of the runs that logged it)."""
        by_step: dict[int, list[float]] = {}
        for r in self.runs:
            for step, v in r.history:
                by_step.setdefault(step, []).append(v)
        return [(s, float(np.mean(v))) for s, v in sorted(by_step.items())]


@dataclass
class Study:
    sweep: str
    metric: str
    mode: str
    parent_run_id: str
    experiment_id: str
    keys: list[str]  # swept keys, seed aside
    configs: list[ConfigGroup]  # ranked, best first
    result: stats.Result
    excluded: dict[str, int]  # reason -> runs left out
    x: str = "step"  # what histories are indexed by: "step", or "samples seen" when the batch size is swept


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def climbing(history: list[tuple[int, float]], mode: str) -> bool:
    """Still improving at its end: the last value beats the one an eval before, or the least-squares slope over the
    last three points points the good way (one noisy eval does not hide a rising curve)."""
    if len(history) < 2:
        return False
    if _better(history[-1][1], history[-2][1], mode):
        return True
    if len(history) >= 3:
        steps, values = zip(*history[-3:])
        slope = float(np.polyfit(steps, values, 1)[0])
        return _better(slope, 0.0, mode)
    return False


def _at(curve: list[tuple[int, float]], step: int) -> float | None:
    """A curve's value at `step`: the last point at or before it."""
    before = [v for s, v in curve if s <= step]
    return before[-1] if before else None


def _steps(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _label(params: dict[str, str], keys: list[str]) -> str:
    return ", ".join(f"{k}={params.get(k)}" for k in keys)


def load(uri: str, sweep: str, metric: str | None = None, mode: str | None = None) -> Study:
    from mlflow import MlflowClient

    from towerlab.tracking.compare import find_sweep

    client = MlflowClient(uri)
    parent = find_sweep(uri, sweep)
    p = parent.data.params
    metric, mode = metric or p.get("metric", "eval/zeroshot/top1"), mode or p.get("mode", "max")
    keys = sorted(k[len("space."):] for k in p if k.startswith("space.") and k != "space.seed")
    x = "samples seen" if "data.global_batch" in keys else "step"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    excluded = {"failed": 0, "without the metric": 0, "still running": 0}
    groups: dict[str, ConfigGroup] = {}
    for r in sorted(children, key=lambda r: r.info.start_time or 0):
        status = r.info.status
        if status == "FAILED":
            excluded["failed"] += 1
            continue
        if status in ("RUNNING", "SCHEDULED"):
            excluded["still running"] += 1
            continue
        hist = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
        if not hist:
            excluded["without the metric"] += 1
            continue
        tags, budget = r.data.tags, _steps(r.data.params.get("train.steps"))
        # stopped by the scheduler: KILLED as a trial, before its budget (older sweeps recorded KILLED at max_t too)
        cut = status == "KILLED" and T.TRIAL_ID in tags and (budget is None or hist[-1].step < budget)
        # a swept batch size: configurations are compared at equal data, not at equal steps
        per_step = (_steps(r.data.params.get("data.global_batch")) or 1) if x == "samples seen" else 1
        rec = RunRecord(r.info.run_id, r.info.run_name, status, r.info.experiment_id,
                        tags.get(T.SEED, r.data.params.get("seed")), [(m.step * per_step, m.value) for m in hist],
                        dict(r.data.metrics), killed_by_scheduler=cut)
        key = tags.get(T.CONFIG) or r.info.run_id  # older sweeps: each run is its own configuration
        if key not in groups:
            params = {k: v for k, v in r.data.params.items() if k != "seed"}
            groups[key] = ConfigGroup(key, _label(params, keys) or r.info.run_name, params)
        groups[key].runs.append(rec)
    _unique_labels(list(groups.values()))
    result = stats.compare({k: [r.value for r in g.runs] for k, g in groups.items()}, mode)
    configs = [groups[c.key] for c in result.configs]
    for g, c in zip(configs, result.configs):
        g.stat = c
    if configs:
        best = configs[0].curve()
        for g in configs:
            for r in g.runs:
                at = _at(best, r.history[-1][0])
                r.cut_climbing = (r.killed_by_scheduler and climbing(r.history, mode) and at is not None
                                  and _better(at, r.value, mode))
    return Study(sweep, metric, mode, parent.info.run_id, parent.info.experiment_id, keys, configs, result,
                 excluded, x)


def _unique_labels(groups: list[ConfigGroup]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:  # an older sweep's repeated sample: same values, another run
            g.label = f"{g.label} #{seen[g.label]}"


def to_json(s: Study) -> dict:
    return {
        "sweep": s.sweep, "metric": s.metric, "mode": s.mode, "value": VALUE_NOTE, "test": s.result.note(),
        "alpha": s.result.alpha, "pairs_tested": s.result.tested, "excluded": s.excluded, "swept_keys": s.keys,
        "tied_with_best": [g.label for g in s.configs if g.stat.mark == "tied with best"],
        "configs": [{
            "rank": g.stat.rank, "config": g.key, "label": g.label, "n": g.stat.n, "mean": g.stat.mean,
            "ci95": None if g.stat.low is None else [g.stat.low, g.stat.high], "mark": g.stat.mark,
            "p_holm_vs_best": g.stat.p_vs_best, "stopped_early_while_improving": g.cut_climbing,
            "params": {k: g.params.get(k) for k in s.keys},
            "runs": [{"run_id": r.run_id, "name": r.name, "status": r.status, "seed": r.seed, "value": r.value,
                      s.x: r.history[-1][0], "cut_climbing": r.cut_climbing} for r in g.runs],
        } for g in s.configs],
        "pairs": [{"a": _name(s, p.a), "b": _name(s, p.b), "p": p.p, "p_holm": p.p_holm,
                   "significant": p.significant} for p in s.result.pairs],
    }


def _name(s: Study, key: str) -> str:
    return next(g.label for g in s.configs if g.key == key)
