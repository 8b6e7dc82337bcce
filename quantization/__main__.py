"""`python -m quantization`: see quantization.cli."""

import sys

from quantization.cli import main

sys.exit(main())
