import sys

from fleet_report.cli import main

sys.exit(main())
