"""Makes `towerlab` importable from the source tree when the package is not installed, and the shared test helpers
(loss_testing.py) importable under pytest's importlib import mode."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import towerlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parents[2] / "platform"))
