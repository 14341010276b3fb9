"""Comparing runs from their MLflow record: a sweep's children (found through the parent run), or any run ids.
Produces rows for a table (best first) and a PNG plot of the final metric against a swept number, one line per
value of a swept category (e.g. metric vs temperature, one line per loss)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from towerlab.config.errors import ConfigError
from towerlab.tracking import tags as T


@dataclass
class Comparison:
    metric: str
    mode: str
    keys: list[str]  # swept recipe keys
    rows: list[dict]  # run_id, name, status, params (keys), metric, loss
    parent_run_id: str | None = None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def find_sweep(uri: str, sweep: str):
    client = _client(uri)
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 f"tags.`{T.SWEEP}` = '{sweep}' and tags.`{T.ROLE}` = 'sweep'",
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise ConfigError(f"no sweep '{sweep}' in the tracking store {uri}: check --tracking-uri and the name "
                          "(`towerlab sweep` prints it)")
    return parents[0]


def compare_sweep(uri: str, sweep: str, metric: str | None = None, mode: str | None = None) -> Comparison:
    client = _client(uri)
    parent = find_sweep(uri, sweep)
    p = parent.data.params
    keys = sorted(k[len("space."):] for k in p if k.startswith("space."))
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return _rows(children, keys, metric or p.get("metric", "eval/zeroshot/top1"), mode or p.get("mode", "max"),
                 parent.info.run_id)


def compare_runs(uri: str, run_ids: list[str], metric: str = "eval/zeroshot/top1", mode: str = "max") -> Comparison:
    client = _client(uri)
    runs = []
    for rid in run_ids:
        try:
            runs.append(client.get_run(rid))
        except Exception:
            raise ConfigError(f"run '{rid}' not found in the tracking store {uri}") from None
    differing = sorted({k for r in runs for k, v in r.data.params.items()
                        if len({str(o.data.params.get(k)) for o in runs}) > 1 and k != "name"})
    return _rows(runs, differing, metric, mode)


def _rows(runs, keys: list[str], metric: str, mode: str, parent: str | None = None) -> Comparison:
    rows = []
    for r in runs:
        m = r.data.metrics
        rows.append({"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                     "params": {k: r.data.params.get(k) for k in keys}, "metric": m.get(metric),
                     "loss": m.get("train/loss")})
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda row: (row["metric"] is None, sign * (row["metric"] or 0.0)))
    return Comparison(metric, mode, keys, rows, parent)


def _number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot(c: Comparison, path: Path) -> Path | None:
    """Final metric vs the first numeric swept key, one line per value of the first categorical one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in c.rows if r["metric"] is not None]
    numeric = [k for k in c.keys if rows and all(_number(r["params"][k]) is not None for r in rows)]
    if not rows or not numeric:
        return None
    x = "loss.temperature_init" if "loss.temperature_init" in numeric else numeric[0]
    cats = [k for k in c.keys if k not in numeric]
    line = "loss.name" if "loss.name" in cats else (cats[0] if cats else None)
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        groups.setdefault(str(r["params"][line]) if line else "all", []).append((_number(r["params"][x]),
                                                                                 r["metric"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if x in ("loss.temperature_init", "optim.lr"):
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(c.metric)
    ax.set_title(f"final {c.metric} vs {x}")
    if line:
        ax.legend(title=line)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_to_parent(uri: str, c: Comparison, png: Path | None, payload: dict | None = None) -> None:
    """The plot and comparison.json (`payload`, a sweep's statistics, else the rows) as artifacts of the parent."""
    if c.parent_run_id is None:
        return
    client = _client(uri)
    if png is not None:
        client.log_artifact(c.parent_run_id, str(png))
    client.log_text(c.parent_run_id, json.dumps(c.rows if payload is None else payload, indent=1, default=str),
                    "comparison.json")
