"""Serial link timing over a pty against the firmware simulator; prints JSON.

- ack_round_trip_ms: SerialLink.send_command -> the matching ack parsed by poll() (pty + simulator).
- failsafe_after_sigkill_ms: a process sending 30 Hz commands through SerialLink is SIGKILLed; time until
  the simulator's log shows neutral (its timeout is --timeout-ms, default 250), and the same measured from
  the last valid line the simulator received (failsafe_after_last_valid_line_ms).

    python benchmarks/serial_failsafe.py [--trials 5] [--acks 300] [--timeout-ms 250]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rover_runtime.serial_link import SerialConfig, SerialLink

REPO = Path(__file__).resolve().parents[1]
SENDER = """
import sys, time
from rover_runtime.serial_link import SerialConfig, SerialLink
link = SerialLink(SerialConfig(port=sys.argv[1]))
assert link.open()
print("ready", flush=True)
while True:
    link.send_command(0.5, 0.3)
    link.poll()
    time.sleep(1 / 30)
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "p50": round(statistics.median(values), 3),
        "p99": round(_percentile(values, 99), 3),
        "max": round(max(values), 3),
    }


def _start_sim(workdir: Path, timeout_ms: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    link, log, status = workdir / "tty", workdir / "fw.jsonl", workdir / "fw.json"
    cmd = [sys.executable, "-m", "rover_runtime.firmware_sim", "--pty-link", str(link), "--log", str(log)]
    cmd += ["--status-file", str(status)]
    proc = subprocess.Popen([*cmd, "--timeout-ms", str(timeout_ms)], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not link.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("error: the firmware simulator did not start")
        time.sleep(0.01)
    return proc, link, log


def _ack_round_trips(link_path: Path, count: int) -> list[float]:
    link = SerialLink(SerialConfig(port=str(link_path), heartbeat_interval_s=10.0))
    if not link.open():
        raise SystemExit(f"error: cannot open {link_path}")
    times = []
    try:
        for i in range(count):
            steering_milli = 1 + i % 500  # consecutive commands differ, so their acks do too
            expected_us = 1500 + steering_milli // 2
            previous = link.stats.last_ack
            start = time.perf_counter()
            link.send_command(steering_milli / 1000, 0.0)
            while (ack := link.stats.last_ack) is previous or ack is None or ack.steer_us != expected_us:
                link.poll()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        link.close()
    return times


def _failsafe_after_kill(link_path: Path, log_path: Path) -> tuple[float, float]:
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(link_path)], cwd=REPO, stdout=subprocess.PIPE
    )
    assert sender.stdout is not None
    if sender.stdout.readline().strip() != b"ready":
        raise SystemExit("error: the sender did not connect")
    time.sleep(0.3)
    killed = time.monotonic()
    sender.send_signal(signal.SIGKILL)
    sender.wait()
    time.sleep(0.6)
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    neutral = [e["mono"] for e in events if e["event"] == "failsafe" and e["mono"] >= killed]
    if not neutral:
        raise SystemExit("error: the simulator never went neutral")
    last_valid = json.loads((log_path.parent / "fw.json").read_text())["last_valid_mono"]
    return (neutral[0] - killed) * 1000, (neutral[0] - float(last_valid)) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--acks", type=int, default=300)
    parser.add_argument("--timeout-ms", type=int, default=250)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serial-bench-") as tmp:
        proc, link_path, log_path = _start_sim(Path(tmp), args.timeout_ms)
        try:
            acks = _ack_round_trips(link_path, args.acks)
            trials = [_failsafe_after_kill(link_path, log_path) for _ in range(args.trials)]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=5)
    result = {
        "benchmark": "serial_failsafe",
        "transport": "pty (os.openpty) + rover_runtime.firmware_sim",
        "firmware_timeout_ms": args.timeout_ms,
        "ack_round_trip_ms": _summary(acks),
        "failsafe_after_sigkill_ms": _summary([t[0] for t in trials]),
        "failsafe_after_last_valid_line_ms": _summary([t[1] for t in trials]),
        "failsafe_within_timeout_plus_50ms": max(t[1] for t in trials) <= args.timeout_ms + 50,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
