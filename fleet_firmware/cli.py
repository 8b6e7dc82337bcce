"""`python -m fleet_firmware build --board uno --out DIR`: the sketch as a release's firmware directory.

Exit status: 0 built, 2 bad input or a build that failed (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fleet_firmware.build import BuildError, build
from rover_runtime.firmware import BOARDS, FirmwareError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet_firmware", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the sketch for a board into a firmware directory")
    b.add_argument("--board", required=True, choices=sorted(BOARDS))
    b.add_argument("--out", type=Path, required=True, help="the firmware directory (replaced)")
    b.add_argument(
        "--build-dir", type=Path, default=Path("out/firmware-build"), help="objects kept between builds"
    )
    b.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a C define for the sketch, e.g. ROVER_FIRMWARE_VERSION='\"2.1.0\"' (repeatable)",
    )
    args = parser.parse_args(argv)
    defines: dict[str, str] = {}
    for item in args.define:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            print(f"fleet_firmware: --define {item!r}: not NAME=VALUE with a C identifier", file=sys.stderr)
            return 2
        defines[name] = value
    try:
        out = build(args.board, args.out, build_dir=args.build_dir.resolve(), defines=defines)
    except (BuildError, FirmwareError) as exc:
        print(f"fleet_firmware: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads((out / "firmware.json").read_text()), indent=1))
    return 0
