"""What the firmware step of every restart onto a release costs (role rover_firmware), on a simulated board:
the compiled sketch on simavr behind Optiboot (firmware/test/simavr_board.c), as avrdude and the runtime see
a USB Arduino. Prints JSON.

- skip_s: `rover-runtime firmware flash` when the board already runs the release's firmware (the usual
  restart): the ping only (opening the port resets the board; the bootloader waits, then the sketch answers).
- flash_s: a new version: ping, avrdude writing and reading back the image through the bootloader, and the
  new firmware's answer. Each run alternates two images (versions 2.0.0 and 2.0.1), so every one flashes.
- avrdude_s_estimate: flash_s's median less two skip_s medians (the pings before and after the write).

The board is simulated in real time (paced to the wall clock), so these are the times a real Uno's
bootloader and line would give, plus the machine's own process start-up. Run it on a quiet machine.

    python benchmarks/firmware_flash.py [--runs 5] [--board uno|nano|nano_old_bootloader]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet_firmware.build import build  # noqa: E402
from quantization.compare import host_info  # noqa: E402
from rover_runtime.firmware import board_named  # noqa: E402
from simfleet.board import SimBoard, build_board  # noqa: E402


def timed_flash(port: Path, board: str, image: Path) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "rover_runtime", "firmware", "flash", "--port", str(port), "--board", board,
         "--firmware", str(image)],
        capture_output=True, text=True, check=False, cwd=REPO, timeout=600,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if run.returncode != 0:
        raise SystemExit(f"firmware flash failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    return seconds, json.loads(run.stdout)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--board", default="uno", choices=["uno", "nano", "nano_old_bootloader"])
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="firmware-flash-") as tmp:
        root = Path(tmp)
        build_board(root / "build")
        images = [
            build(args.board, root / f"image-{v}", build_dir=root / "build",
                  defines={"ROVER_FIRMWARE_VERSION": f'"2.0.{v}"'})
            for v in (0, 1)
        ]  # fmt: skip
        bootloader = board_named(args.board).bootloader
        skip: list[float] = []
        flash: list[float] = []
        with SimBoard(root / "build", root / "flash.bin", root / "tty", bootloader) as sim:
            timed_flash(sim.port, args.board, images[0])  # a new board: its first program
            for _ in range(args.runs):
                seconds, result = timed_flash(sim.port, args.board, images[0])
                assert not result["flashed"], result
                skip.append(seconds)
                seconds, result = timed_flash(sim.port, args.board, images[1])
                assert result["flashed"], result
                flash.append(seconds)
                images.reverse()  # the one just written is on the board now
    report = {
        "board": args.board,
        "bootloader": bootloader,
        "skip_s": summary(skip),
        "flash_s": summary(flash),
        "avrdude_s_estimate": round(statistics.median(flash) - 2 * statistics.median(skip), 2),
        "host": {**host_info(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
