"""`python -m towerlab.cli ...`, as job entrypoints run it."""

import sys

from towerlab.cli import main

sys.exit(main())
