import sys

from fleet_firmware.cli import main

sys.exit(main())
