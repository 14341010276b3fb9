"""What a run records about where it came from: the code's git commit and the versions of the packages that
matter. `towerlab reproduce` compares both against the current checkout."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

PACKAGES = ("towerlab", "ray", "torch", "deepspeed", "mlflow")


def git_commit() -> str:
    """HEAD of the checkout towerlab runs from, "-dirty" when tracked files have changes; "unknown" outside git."""
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Python's version and each of PACKAGES' installed version ("not installed" when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
