"""The `towerlab` command. One module per command group: train.py (train, plan, recipes), sweep.py (sweep,
compare), runs.py (eval, reproduce, ui), data.py (data prepare), cluster.py (submit, jobs, k8s). Library modules
never import this package; it imports them, inside the commands, so `towerlab --help` starts fast.

User errors (ConfigError: a recipe typo, a wrong type, a missing file, an unreachable server) print one line and
exit 2; a failed training run prints its cause and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from towerlab.config import ConfigError
from towerlab.config.secrets import redact_text

console = Console(stderr=False)  # results
err = Console(stderr=True)  # errors and warnings

GROUPS = ("train", "sweep", "data", "runs", "cluster")  # the modules of this package, in --help order


class Parser(argparse.ArgumentParser):
    """argparse's usage errors (an unknown --format, a missing argument) as one `error:` line too, exit 2; the usage
    stays one `--help` away. Subcommand parsers inherit this class."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = Parser(prog="towerlab", description="Contrastive multimodal pretraining on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        importlib.import_module(f"towerlab.cli.{group}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _console_level(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ConfigError as e:
        err.print(f"[red]error:[/] {escape(redact_text(str(e)))}", highlight=False, soft_wrap=True)  # e may hold ray[default]
        return 2


def _console_level(verbose: bool) -> None:
    """-v: everything streams (towerlab.util.verbose). Otherwise the libraries' INFO lines that say nothing to act
    on stay off the console: MLflow's store set-up notes, Ray's note that token authentication is on."""
    import logging
    import os

    from towerlab.util import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
