"""Shared by the benchmarks: write a result as benchmarks/results/NAME.json, whole or not at all (a benchmark killed
while writing must not leave a half-written result that reads as a measurement)."""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(result: dict, name: str | None = None, path: Path | str | None = None) -> Path:
    """Write `result` as JSON to `path`, or to benchmarks/results/<name>.json; returns where it went."""
    out = Path(path) if path is not None else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    return out
