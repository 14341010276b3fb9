"""Makes the shared unit-test helpers beside this file (clip_testing.py) importable under pytest's importlib import
mode."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
