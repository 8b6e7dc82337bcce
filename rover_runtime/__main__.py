"""`python -m rover_runtime ...`: the `rover-runtime` console script (what bin/rover-runtime runs)."""

from __future__ import annotations

import sys

from rover_runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
