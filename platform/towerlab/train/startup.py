"""Where a run's start-up goes: wall-clock marks from the moment `train()` is called to the first optimizer step,
logged to the run as `startup/<phase>_s` (seconds since that moment, cumulative) at step 0.

In a sweep of short trials start-up is most of a trial, so it is measured on every run, not only in a benchmark:
the MLflow UI shows it per run, and benchmarks/startup.py takes the median over a sweep's trials. The driver marks
its phases (checks, MLflow run, Ray, dataset) and hands its launch time to the workers; rank 0 marks its own (worker
group up, model, DeepSpeed engine, evaluators, first batch, first step) and logs all of them. Driver and rank 0 may
run on different nodes: the marks then include the clocks' offset (NTP keeps it to milliseconds).
"""

from __future__ import annotations

import time

PREFIX = "startup/"

# In order. Driver: checks (recipe, memory, storage, tracking server, data listing), mlflow (the run opened and its
# recipe, data identity and inputs logged), ray (connected or started), dataset (Ray Data pipeline and trainer built).
# Rank 0: workers (Ray Train's controller, worker group and process group up, loop entered), model, engine
# (deepspeed.initialize), evaluators (evaluation data read and preprocessed), first_batch (Ray Data's first
# micro-batch on this worker), first_step (the first optimizer step done).
DRIVER = ("checks", "mlflow", "ray", "dataset")
WORKER = ("workers", "model", "engine", "evaluators", "first_batch", "first_step")
PHASES = DRIVER + WORKER


class Timeline:
    """Marks of one process, in seconds since `t0` (a time.time() taken by the driver)."""

    def __init__(self, t0: float | None = None, marks: dict[str, float] | None = None):
        self.t0 = time.time() if t0 is None else t0
        self.marks: dict[str, float] = dict(marks or {})

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown start-up phase {phase!r} (one of {', '.join(PHASES)})")
        self.marks[phase] = round(time.time() - self.t0, 3)

    def metrics(self) -> dict[str, float]:
        return {f"{PREFIX}{p}_s": self.marks[p] for p in PHASES if p in self.marks}


def durations(marks: dict[str, float]) -> dict[str, float]:
    """Per-phase seconds (each mark minus the one before it) from cumulative marks keyed by phase name; a phase
    whose mark is missing (e.g. a resumed run) is left out and the next phase counts from the last present one."""
    out, last = {}, 0.0
    for p in PHASES:
        if p in marks:
            out[p] = round(marks[p] - last, 3)
            last = marks[p]
    return out

