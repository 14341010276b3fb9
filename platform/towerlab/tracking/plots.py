"""The report's plots of a study (tracking/study.py), drawn with matplotlib as inline SVG text so that the HTML page
needs no network and no files beside it: the metric against a swept number (temperature, batch size) with 95%
interval bars, one line per value of the other swept keys (e.g. per loss); learning curves per configuration (the
mean over seeds); the geometry metrics per configuration. A plot whose axis the sweep did not vary is not drawn."""

from __future__ import annotations

import io

import numpy as np

from towerlab.tracking import stats

GEOMETRY = ("modality_gap", "alignment", "uniformity", "effective_rank")  # eval/geometry.py's names (prefixes)
LOG_AXES = {"loss.temperature_init": 10, "optim.lr": 10, "data.global_batch": 2}


def _number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: without the XML declaration and doctype


def _figure(w: float = 6.4, h: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text as text: smaller, and no glyph ids repeated across the page's SVGs
    return plt.subplots(figsize=(w, h))


def _half(st: stats.ConfigStat) -> float:
    return 0.0 if st.low is None else (st.high - st.low) / 2


def varied(study, key: str) -> bool:
    """The sweep varied `key` over numbers: more than one distinct numeric value among its configurations."""
    values = {_number(g.params.get(key)) for g in study.configs}
    return None not in values and len(values) > 1


def metric_vs(study, x: str) -> str:
    """The metric's mean against swept number `x`, interval bars, a line per combination of the other swept keys."""
    others = [k for k in study.keys if k != x]
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for g in study.configs:
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={g.params.get(k)}" for k in others) or "all"
        lines.setdefault(name, []).append((_number(g.params[x]), g.stat.mean, _half(g.stat)))
    fig, ax = _figure()
    for name, pts in sorted(lines.items()):
        pts.sort()
        xs, ys, err = zip(*pts)
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    if x in LOG_AXES:
        ax.set_xscale("log", base=LOG_AXES[x])
    ax.set_xlabel(x)
    ax.set_ylabel(f"{study.metric} (mean, 95% CI)")
    ax.set_title(f"{study.metric} vs {x}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _svg(fig)


def learning_curves(study) -> str:
    """The metric over steps (samples seen, when the batch size is swept) per configuration, the mean over its seeds;
    dashed where the scheduler cut a climb."""
    fig, ax = _figure(7.5, 4.5)
    for g in study.configs:
        curve = g.curve()
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", linestyle="--" if g.cut_climbing else "-",
                label=f"#{g.stat.rank} {g.label}")
    ax.set_xlabel(study.x)
    ax.set_ylabel(f"{study.metric} (mean over seeds)")
    ax.set_title("learning curves (dashed: stopped early while still improving)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _svg(fig)


def geometry_names(study) -> list[str]:
    names = {m for g in study.configs for r in g.runs for m in r.metrics
             if m.startswith("eval/") and m.rsplit("/", 1)[-1].startswith(GEOMETRY)}
    return sorted(names)


def geometry(study, names: list[str]) -> str:
    """Each geometry metric's final value per configuration (mean over seeds, 95% interval bars), one panel each."""
    import matplotlib.pyplot as plt

    _figure()  # the backend and rc settings
    plt.close("all")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.35 * len(study.configs) * rows + 1.5 * rows),
                             squeeze=False)
    labels = [f"#{g.stat.rank} {g.label}" for g in study.configs]
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        means, errs = [], []
        for g in study.configs:
            values = [r.metrics[name] for r in g.runs if name in r.metrics]
            low, high = stats.interval(values)
            means.append(float(np.mean(values)) if values else np.nan)
            errs.append(0.0 if low is None else (high - low) / 2)
        ax.barh(range(len(labels)), means, xerr=errs, capsize=2, color="tab:blue", alpha=0.7)
        ax.set_yticks(range(len(labels)), labels if i % cols == 0 else [""] * len(labels), fontsize="x-small")
        ax.invert_yaxis()  # rank 1 on top
        ax.set_title(name, fontsize="small")
        ax.grid(alpha=0.3, axis="x")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _svg(fig)
