"""`towerlab report`: a sweep's study (tracking/study.py) as one self-contained HTML page, with the plots of
tracking/plots.py inline, the comparison table with links to the MLflow runs, the statistical note and the early-stop
marks. Viewing it needs no network (no scripts, styles or images from elsewhere), so it can be mailed or committed.

The page starts with a marker comment: towerlab overwrites a file only if it carries it (a report it wrote before),
never a file of someone else's that happens to sit at --out."""

from __future__ import annotations

import html
import time
from pathlib import Path

from towerlab.config.errors import ConfigError
from towerlab.tracking import plots
from towerlab.tracking.study import CUT_NOTE, VALUE_NOTE, Study

MARKER = "<!-- towerlab report: written by `towerlab report`, which may overwrite it -->"
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.cut td{background:#fff4e0}
figure{margin:1.5em 0}figure svg{max-width:100%;height:auto}.note{color:#555;font-size:14px}"""


def check_target(path: Path) -> None:
    """Refuse to replace a file towerlab did not write (one line naming it and the way out)."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory: give a file name, e.g. {path}/report.html")
    if path.exists():
        try:
            head = path.read_text(errors="replace")[:4096]
        except OSError as e:
            raise ConfigError(f"--out {path} cannot be read ({e.strerror}): give another --out") from None
        if MARKER not in head:
            raise ConfigError(f"--out {path} exists and is not a towerlab report: move it or give another --out")


def run_link(uri: str, exp: str, run: str) -> str | None:
    """The MLflow UI's page of a run, when the tracking URI is a server (which serves the UI); else None."""
    if uri.startswith(("http://", "https://")):
        from towerlab.tracking import redact

        return f"{redact(uri).rstrip('/')}/#/experiments/{exp}/runs/{run}"
    return None


def _e(v) -> str:
    return html.escape(str(v))


def _table(s: Study, uri: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in ["rank", *s.keys, "n", "mean", "95% CI", "vs best (Holm p)",
                                                   "early stop", "runs (seed)"])
    rows = []
    for g in s.configs:
        st = g.stat
        ci = "n=1: no interval" if st.low is None else f"{st.low:.4f} to {st.high:.4f}"
        p = "" if st.p_vs_best is None else f" (p={st.p_vs_best:.2g})"
        verdict = {"best": "best", "tied with best": "tied with best" + p,
                   "worse": "significantly worse" + p, "not tested": "not tested (n&lt;2 or no spread)"}[st.mark]
        runs = []
        for r in g.runs:
            link, text = run_link(uri, r.experiment_id, r.run_id), f"{_e(r.name)} ({_e(r.seed)})"
            runs.append(f'<a href="{_e(link)}">{text}</a>' if link else f"{text} <code>{r.run_id}</code>")
        cells = [f'<td class="num">{st.rank}</td>', *(f"<td>{_e(g.params.get(k))}</td>" for k in s.keys),
                 f'<td class="num">{st.n}</td>', f'<td class="num">{st.mean:.4f}</td>', f"<td>{ci}</td>",
                 f"<td>{verdict}</td>", f"<td>{'stopped early while still improving' if g.cut_climbing else ''}</td>",
                 f"<td>{'<br>'.join(runs)}</td>"]
        rows.append(f'<tr class="config{" cut" if g.cut_climbing else ""}">{"".join(cells)}</tr>')
    return f'<table id="comparison"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _figure(name: str, svg: str, caption: str) -> str:
    return f'<figure class="plot" data-plot="{name}">{svg}<figcaption class="note">{_e(caption)}</figcaption></figure>'


def render(s: Study, uri: str) -> str:
    figures = []
    for key, what in (("loss.temperature_init", "temperature"), ("data.global_batch", "batch size")):
        if plots.varied(s, key):
            figures.append(_figure(f"vs-{key}", plots.metric_vs(s, key),
                                   f"{s.metric} against the {what}: each point a configuration's mean over seeds, "
                                   "bars its 95% interval (none for n=1)"))
    if s.configs:
        figures.append(_figure("curves", plots.learning_curves(s), f"learning curves: the mean over seeds at each "
                                                                    f"evaluation, against {s.x}"))
    names = plots.geometry_names(s)
    if names:
        figures.append(_figure("geometry", plots.geometry(s, names), "embedding geometry at the end of training "
                                                                     "(eval/geometry.py), mean over seeds, 95% bars"))
    from towerlab.tracking import redact

    links = ("Run links open the MLflow UI of the tracking server" if run_link(uri, "0", "0") else
             f"The tracking URI ({_e(redact(uri))}) is not a server, so runs are listed by id: open them with "
             f"<code>towerlab ui --tracking-uri {_e(redact(uri))}</code>")
    gone = ", ".join(f"{n} {why}" for why, n in s.excluded.items() if n)
    cut = [f"<li>rank {g.stat.rank} ({_e(g.label)}): {CUT_NOTE}</li>" for g in s.configs if g.cut_climbing]
    tied = [_e(g.label) for g in s.configs if g.stat.mark == "tied with best"]
    best = _e(s.configs[0].label) if s.configs else "none"
    return f"""<!DOCTYPE html>
{MARKER}
<html lang="en"><head><meta charset="utf-8"><title>towerlab report: sweep {_e(s.sweep)}</title>
<style>{STYLE}</style></head><body>
<h1>Sweep <code>{_e(s.sweep)}</code></h1>
<p class="note">{_e(s.metric)} ({s.mode}); {len(s.configs)} configurations; generated
{time.strftime("%Y-%m-%d %H:%M %Z")} from MLflow parent run <code>{s.parent_run_id}</code>.</p>
<h2>Comparison</h2>
<p>Best: {best}. Not significantly different from it: {", ".join(tied) or "none"}.</p>
{_table(s, uri)}
<p class="note">{VALUE_NOTE[0].upper() + VALUE_NOTE[1:]}. Test: {_e(s.result.note())}. Excluded runs: {gone or "none"}. {links}.</p>
<h2>Early stopping</h2>
{f"<ul>{''.join(cut)}</ul>" if cut else "<p>No configuration was stopped while still improving below the best.</p>"}
<h2>Plots</h2>
{"".join(figures)}
</body></html>
"""


def write(s: Study, uri: str, out: Path) -> Path:
    """Write the page to `out` (refusing a file towerlab did not write) and log it to the parent as report.html."""
    from mlflow import MlflowClient

    check_target(out)
    page = render(s, uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    MlflowClient(uri).log_text(s.parent_run_id, page, "report.html")
    return out
