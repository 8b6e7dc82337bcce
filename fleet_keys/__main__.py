import sys

from fleet_keys.cli import main

sys.exit(main())
