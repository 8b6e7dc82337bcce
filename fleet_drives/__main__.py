import sys

from fleet_drives.cli import main

sys.exit(main())
