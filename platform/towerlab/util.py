"""Small helpers every layer uses, each written once: the atomic write (a temporary name, then a rename, so a reader
never sees half a file), the closest-name hint of an error message, a free or busy TCP port on loopback, and the
deadline poll. Imports nothing of towerlab, so any module may use it."""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it is renamed over `path` in one step, on an
    exception it is removed and `path` is untouched."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def closest(name: str, candidates: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The candidate nearest to a mistyped `name`, for "did you mean" hints; None when nothing is close."""
    found = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=cutoff)
    return found[0] if found else None


def did_you_mean(name: str, candidates: Sequence[str], cutoff: float = 0.6) -> str:
    """" Did you mean 'x'?" for the closest candidate, or "" when none is close: the tail of an error line."""
    near = closest(name, candidates, cutoff)
    return f" Did you mean '{near}'?" if near else ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on `host` now (another process may still take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host` now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(check: Callable[[], T], timeout: float, interval: float = 0.5) -> T | None:
    """Call `check` every `interval` seconds until it returns something truthy (returned) or `timeout` seconds have
    passed (None). Exceptions from `check` propagate: a check that can fail transiently catches its own."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


VERBOSE_ENV = "TOWERLAB_VERBOSE"  # `-v`: set by the CLI, passed to every Ray task and actor of the job


def verbose() -> bool:
    """Whether Ray's worker logs and Ray Data's progress stream to the console (`towerlab train|sweep -v`); else
    they go to files and the console keeps towerlab's own lines."""
    return os.environ.get(VERBOSE_ENV) == "1"


CONSOLE_FILE = "console.log"
CONSOLE_ENV = "TOWERLAB_CONSOLE"  # a worker's file of lines meant for the user's console (set by redirect_output)


def say(line: str) -> None:
    """One line for the user's console from wherever this process runs: on stderr, and, in a Ray worker whose
    output goes to a file, also appended to the run's console file, which the driver echoes (train/driver.py)."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    console = os.environ.get(CONSOLE_ENV)
    if console:
        with open(console, "a") as f:  # one write of a short line: whole lines, also from two ranks at once
            f.write(line + "\n")


def redirect_output(path: str | os.PathLike) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and subprocess output too) to the
    end of `path`. For a Ray worker whose logs are not streamed to the console: they stay findable in the run
    directory."""
    import sys

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ[CONSOLE_ENV] = str(Path(path).parent / CONSOLE_FILE)
