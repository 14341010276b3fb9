"""Recognising a run whose driver died. While a run is RUNNING its driver (the `towerlab train` process, a sweep
driver, a sweep trial) writes the tag `towerlab.heartbeat` (Unix seconds) every INTERVAL_S from a daemon thread. A
process killed with SIGKILL, an OOM kill or a lost node cannot end its run; its heartbeat then stops. A RUNNING run
whose heartbeat is older than STALE_AFTER_S is dead: `towerlab runs doctor --fix` and the next launch of the same run
name close it FAILED with the reason `driver died: no heartbeat since ...`.

Runs without the tag (not started by towerlab, or by a towerlab before the heartbeat) are never touched.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from towerlab.tracking import tags as T

INTERVAL_S = 30.0
# Ten missed beats: a driver that is merely slow (a loaded machine, a store that is briefly down) is not declared dead.
STALE_AFTER_S = 300.0


def beat(client, run_id: str, now: float | None = None) -> None:
    client.set_tag(run_id, T.HEARTBEAT, f"{time.time() if now is None else now:.0f}")


class Heartbeat:
    """A daemon thread that writes the run's heartbeat tag now and every `interval` seconds until `stop()`. A failed
    write (the store is down for a while) is skipped: the next one may succeed, and a long outage is what staleness
    means anyway."""

    def __init__(self, client, run_id: str, interval: float = INTERVAL_S):
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Heartbeat":
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"towerlab-heartbeat-{self.run_id[:8]}")
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            beat(self.client, self.run_id)
        except Exception:  # noqa: BLE001: a missed beat is harmless; a missed end would not be
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def last_beat(run) -> float | None:
    """The run's latest heartbeat (Unix seconds), or None when it has none."""
    value = run.data.tags.get(T.HEARTBEAT)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def dead_reason(last: float) -> str:
    return f"driver died: no heartbeat since {when(last)}"


def is_stale(run, stale_after: float = STALE_AFTER_S, now: float | None = None) -> bool:
    """A RUNNING run with a heartbeat older than `stale_after` seconds."""
    last = last_beat(run)
    now = time.time() if now is None else now
    return run.info.status == "RUNNING" and last is not None and now - last > stale_after


@dataclass
class DeadRun:
    run_id: str
    name: str
    experiment: str
    last_beat: float


def dead_runs(client, stale_after: float = STALE_AFTER_S, now: float | None = None) -> list[DeadRun]:
    """Every RUNNING run, in every experiment of the store, whose heartbeat is stale."""
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    found, token = [], None
    while exps:
        page = client.search_runs(list(exps), "attributes.status = 'RUNNING'", max_results=1000, page_token=token)
        for r in page:
            if is_stale(r, stale_after, now):
                found.append(DeadRun(r.info.run_id, r.info.run_name, exps[r.info.experiment_id], last_beat(r)))
        token = page.token
        if not token:
            break
    return found


def close_dead(client, run_id: str, last: float) -> str:
    """End a dead run FAILED with the reason as its failure tag; returns the reason."""
    reason = dead_reason(last)
    client.set_tag(run_id, T.FAILURE, reason)
    client.set_terminated(run_id, status="FAILED")
    return reason
