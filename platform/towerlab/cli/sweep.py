"""`towerlab sweep` (a Ray Tune sweep of a recipe, or --resume of one), `towerlab compare` (a sweep's configurations
with their statistics, or any runs, as a table and a plot) and `towerlab report` (a sweep as one HTML page)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Column, Table

from towerlab.cli import console, err
from towerlab.config import ConfigError


def cmd_sweep(args: argparse.Namespace) -> int:
    from towerlab.cli.train import stopped
    from towerlab.tracking import redact, stop as signals

    signals.install()  # SIGTERM and Ctrl-C end the parent run and its open children KILLED before the process exits
    try:
        summary = _sweep(args)
    except KeyboardInterrupt:
        return stopped(f"sweep '{args.resume or args.sweep}'", None)
    console.print(f"sweep '{summary.name}': {summary.trials} trials, {summary.errors} failed; MLflow parent run "
                  f"{summary.parent_run_id}")
    if summary.best_metric is not None:
        console.print(f"best {summary.best_metric:.4f} with {summary.best_config}")
    console.print(f"compare: towerlab compare --sweep {summary.name} --tracking-uri {redact(summary.tracking_uri)}")
    console.print(f"report:  towerlab report --sweep {summary.name} --tracking-uri {redact(summary.tracking_uri)}")
    return 0


def _sweep(args: argparse.Namespace):
    from towerlab.sweep.load import load_sweep
    from towerlab.sweep.run import STATE_FILE, run_sweep

    if (args.retry_failed or args.extend) and not args.resume:
        raise ConfigError("--retry-failed and --extend act on an existing sweep: add --resume NAME")
    if args.extend is not None and not 1 <= args.extend <= 100:
        raise ConfigError(f"--extend {args.extend}: give the number of seeds to add to every configuration, 1 to 100")
    if args.resume:
        from towerlab.config import load_structured
        from towerlab.sweep.run import read_state
        from towerlab.sweep.schema import SweepConfig

        state = Path(args.storage_path) / args.resume / STATE_FILE
        if not state.is_file():
            raise ConfigError(f"no sweep '{args.resume}' to resume: {state} does not exist (see --storage-path)")
        saved = read_state(state)  # a corrupt or foreign file: one line
        sweep_file = saved.get("sweep_file")
        if not isinstance(sweep_file, str):
            raise ConfigError(f"{state} names no sweep file: start the sweep again from its file")
        try:
            sweep = load_structured(SweepConfig, None, [], base=saved["sweep"])
        except ConfigError as e:
            raise ConfigError(f"{state}: the saved sweep does not load ({e}): start it again under a new name") \
                from None
        summary = run_sweep(sweep, sweep_file, tracking_uri=args.tracking_uri, resume=True,
                            retry_failed=args.retry_failed, extend=args.extend or 0)
    else:
        if not args.sweep:
            raise ConfigError("give a sweep file (e.g. sweeps/quickstart.yaml) or --resume NAME")
        sweep = load_sweep(args.sweep, args.overrides)
        from towerlab.tracking import check_reachable, resolve_uri

        check_reachable(resolve_uri(sweep.tracking.uri, args.tracking_uri))  # before the first line of output
        console.print(f"[bold]sweep[/] [cyan]{sweep.name}[/]: {len(sweep.space)} searched keys, "
                      f"scheduler {sweep.scheduler.name}, metric {sweep.metric} ({sweep.mode})")
        summary = run_sweep(sweep, args.sweep, tracking_uri=args.tracking_uri)
    return summary


def cmd_compare(args: argparse.Namespace) -> int:
    from towerlab.tracking import check_reachable, resolve_uri
    from towerlab.tracking.uri import require_store, store_errors

    if not (args.sweep or args.runs):
        raise ConfigError("give --sweep NAME or one or more MLflow run ids")
    uri = resolve_uri(None, args.tracking_uri)
    check_reachable(uri)
    require_store(uri, f"no sweep '{args.sweep}'" if args.sweep else f"no MLflow run '{args.runs[0]}'")
    with store_errors(uri):
        return _compare(args, uri)


def _compare(args: argparse.Namespace, uri: str) -> int:
    from towerlab.tracking.compare import compare_runs, compare_sweep, log_to_parent, plot

    payload = None
    if args.sweep:
        from towerlab.tracking import study

        s = study.load(uri, args.sweep, args.metric, args.mode)
        console.print(_study_table(s))
        payload = study.to_json(s)
        c = compare_sweep(uri, args.sweep, args.metric, args.mode)
    else:
        c = compare_runs(uri, args.runs, args.metric or "eval/zeroshot/top1", args.mode or "max")
        t = Table("#", "run", "status", *c.keys, c.metric, "train/loss")
        for i, r in enumerate(c.rows, 1):
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            t.add_row(str(i), r["name"], r["status"], *(str(r["params"][k]) for k in c.keys), fmt(r["metric"]),
                      fmt(r["loss"]))
        console.print(t)
    out = Path(args.out or f"results/compare-{args.sweep or 'runs'}.png").absolute()
    png = plot(c, out)
    log_to_parent(uri, c, png, payload)
    if png:
        console.print(f"plot: {png}" + (" (also an artifact of the sweep's parent run)" if c.parent_run_id else ""))
    return 0


def _study_table(s) -> Table:
    """One row per configuration, best first, a column per swept key, with the test's verdict against the best; the
    caption says what a value is, which test ran, what was left out, and which ranks are not conclusions."""
    from towerlab.tracking.study import CUT_NOTE, VALUE_NOTE

    short = [k.rsplit(".", 1)[-1] for k in s.keys]
    heads = short if len(set(short)) == len(short) else s.keys  # full keys only where the last parts collide
    fixed = dict(no_wrap=True, justify="right")  # numbers are not wrapped: the swept values' columns give way
    t = Table(Column("#", **fixed), *heads, Column("n", **fixed), Column("mean ± 95% CI", **fixed),
              Column("vs best", no_wrap=True), caption_justify="left",
              title=f"sweep '{s.sweep}': {s.metric} ({s.mode}), {len(s.configs)} configurations")
    cut = []
    for g in s.configs:
        st = g.stat
        ci = " (n=1)" if st.low is None else f" ± {(st.high - st.low) / 2:.4f}"
        p = "" if st.p_vs_best is None else f" p={st.p_vs_best:.2g}"
        verdict = {"best": "best", "tied with best": "tied" + p, "worse": "worse" + p,
                   "not tested": "untested"}[st.mark]
        t.add_row(f"{st.rank}*" if g.cut_climbing else str(st.rank), *(str(g.params.get(k)) for k in s.keys),
                  str(st.n), f"{st.mean:.4f}{ci}", verdict)
        if g.cut_climbing:
            cut.append(f"rank {st.rank} ({g.label})")
    gone = ", ".join(f"{n} {why}" for why, n in s.excluded.items() if n)
    tied = [g.label for g in s.configs if g.stat.mark == "tied with best"]
    t.caption = (f"{VALUE_NOTE[0].upper() + VALUE_NOTE[1:]}. Test: {s.result.note()}; tied = not significantly "
                 f"different from the best ({len(tied)}), worse = significantly worse, untested = n<2 or no spread."
                 + (f" Excluded runs: {gone}." if gone else "")
                 + "".join(f"\n* {c}: {CUT_NOTE}." for c in cut))
    return t


def cmd_report(args: argparse.Namespace) -> int:
    from towerlab.tracking import check_reachable, resolve_uri
    from towerlab.tracking.report import check_target
    from towerlab.tracking.uri import require_store, store_errors

    out = Path(args.out or f"results/report-{args.sweep}.html").absolute()
    check_target(out)  # before reading the store: a refused --out costs nothing
    uri = resolve_uri(None, args.tracking_uri)
    check_reachable(uri)
    require_store(uri, f"no sweep '{args.sweep}'")
    with store_errors(uri):
        from towerlab.tracking import report, study

        s = study.load(uri, args.sweep, args.metric, args.mode)
        report.write(s, uri, out)
    console.print(f"report: {out} (also report.html, an artifact of the sweep's parent run {s.parent_run_id})")
    return 0


def register(sub) -> None:
    """`sweep`, `compare` and `report` under the top-level parser's subcommands."""
    s = sub.add_parser("sweep", help="run a Ray Tune sweep of a recipe (one MLflow child run per trial)")
    s.add_argument("sweep", nargs="?", help="sweep YAML file, e.g. sweeps/quickstart.yaml")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file, e.g. search.num_samples=2")
    s.add_argument("--resume", metavar="NAME", help="continue sweep NAME (after the driver was stopped or killed)")
    s.add_argument("--retry-failed", action="store_true", help="with --resume: rerun the trials that failed (each "
                   "continues its MLflow run from its latest checkpoint)")
    s.add_argument("--extend", type=int, metavar="K", help="with --resume: train every configuration the sweep ran "
                   "with K more seeds (replicates), under the same MLflow parent run")
    s.add_argument("--storage-path", default="results", help="where sweeps keep their state (default: results)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (else the sweep file, MLFLOW_TRACKING_URI, ./mlruns.db)")
    s.add_argument("-v", "--verbose", action="store_true", help="stream the trials' Ray worker logs and Ray Data's "
                   "progress")
    s.set_defaults(func=cmd_sweep)

    c = sub.add_parser("compare", help="table and plot of a sweep's trials, or of any runs")
    c.add_argument("runs", nargs="*", help="MLflow run ids")
    c.add_argument("--sweep", help="sweep name")
    c.add_argument("--metric", help="metric to rank by (default: the sweep's metric)")
    c.add_argument("--mode", choices=["max", "min"])
    c.add_argument("--out", help="PNG path (default: results/compare-<sweep>.png)")
    c.add_argument("--tracking-uri", help="MLflow tracking URI")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="a sweep as one self-contained HTML page: plots, statistics, run links")
    r.add_argument("--sweep", required=True, help="sweep name")
    r.add_argument("--out", help="HTML path (default: results/report-<sweep>.html; replaces only a towerlab report)")
    r.add_argument("--metric", help="metric to rank by (default: the sweep's metric)")
    r.add_argument("--mode", choices=["max", "min"])
    r.add_argument("--tracking-uri", help="MLflow tracking URI")
    r.set_defaults(func=cmd_report)
