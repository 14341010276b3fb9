"""Stop signals. A `towerlab train` or `towerlab sweep` stopped by SIGTERM (`towerlab jobs stop`, `ray job stop`, a
pod eviction, a preemption) or SIGINT (Ctrl-C) must end its MLflow runs KILLED before it exits. `install()` (called
by the CLI) turns both signals into KeyboardInterrupt in the main thread, which the driver's KILLED path catches.

Ray replaces handlers: `ray.init` installs a SIGTERM handler that calls sys.exit, Ray Train's `fit` a SIGINT handler
that aborts the run without telling the caller, Tune a SIGINT handler that ends the sweep as if it had finished. So
the drivers call `reinstall()` after starting Ray (and disable Train's and Tune's own); it does nothing in a process
where `install()` was not called (a library user keeps their own handlers) or off the main thread (a sweep trial).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state: dict = {"installed": False, "received": None}


def _raise(signum, frame) -> None:
    _state["received"] = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread from now on."""
    _state["installed"] = True
    reinstall()


def reinstall() -> None:
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


def installed() -> bool:
    return _state["installed"]


def received() -> int | None:
    """The stop signal received, if any."""
    return _state["received"]


def exit_code() -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(_state["received"] or signal.SIGINT)
