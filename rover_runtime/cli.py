"""`rover-runtime`: run (drive the car), benchmark (time the policy), check (a self-test a deploy gates on).

Exit status: 0 success, 1 a check failed or the runtime failed, 2 bad input (config, bundle, arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rover_runtime.bundle import BundleError
from rover_runtime.config import ConfigError, RuntimeConfig, load_config, make_serial_link

log = logging.getLogger("rover_runtime")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# How long `run` waits at start for the firmware to identify itself (an Arduino resets on open: ~1.5 s).
IDENTIFY_TIMEOUT_S = 3.0
# The active release's config on a car the deploy set up.
ACTIVE_CONFIG = Path("/opt/rover/current/runtime.toml")


def _setup_logging(level: str, stream: Any = None) -> None:
    # Under systemd (JOURNAL_STREAM set) journald adds the time; elsewhere we do.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=stream or sys.stdout, force=True)


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML config file (defaults: rover_runtime/default_config.toml)"
    )
    parser.add_argument(
        "--bundle", "--checkpoint", dest="bundle", help="model bundle directory (policy.bundle)"
    )
    parser.add_argument("--policy-stub", action="store_true", help="drive a stub policy instead of a bundle")
    parser.add_argument(
        "--camera",
        "--camera_id",
        dest="camera",
        help="camera index or device path, or 'synthetic' (camera.*)",
    )
    parser.add_argument("--video", help="use a video file as the camera (camera.source = file)")
    parser.add_argument(
        "--serial-port", "--arduino_port", dest="serial_port", help="Arduino serial device (serial.port)"
    )
    parser.add_argument(
        "--rate", "--control_freq", dest="rate", type=float, help="control rate Hz (control.rate_hz)"
    )
    parser.add_argument("--mode", choices=("auto", "chunk", "ensemble"), help="control.mode")
    parser.add_argument(
        "--threads", type=int, help="inference threads, 0 = every core but one (policy.threads)"
    )
    parser.add_argument(
        "--engine", help="quantized engine: auto, qnnpack, x86, fbgemm, onednn (policy.engine)"
    )
    parser.add_argument("--metrics-path", help="status JSON file, '' for none (metrics.path)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging.level")
    parser.add_argument("--max-cycles", type=int, help="stop after this many control cycles (tests)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.bundle is not None:
        out["policy.bundle"] = args.bundle
    if args.policy_stub:
        out["policy.stub"] = True
    if args.camera is not None:
        if args.camera == "synthetic":
            out["camera.source"] = "synthetic"
        else:
            out["camera.source"], out["camera.device"] = "device", args.camera
    if args.video is not None:
        out["camera.source"], out["camera.file"] = "file", args.video
    for attr, key in _PLAIN_OVERRIDES:
        value = getattr(args, attr)
        if value is not None:
            out[key] = value
    return out


# Flags that set one config key as they are: (argparse dest, config key).
_PLAIN_OVERRIDES = (
    ("serial_port", "serial.port"),
    ("rate", "control.rate_hz"),
    ("mode", "control.mode"),
    ("threads", "policy.threads"),
    ("engine", "policy.engine"),
    ("metrics_path", "metrics.path"),
    ("log_level", "logging.level"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rover-runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="drive the car: camera -> policy -> serial, at a fixed rate")
    _add_run_args(run)

    bench = sub.add_parser("benchmark", help="time the policy on this host; prints JSON")
    bench.add_argument("--bundle", "--checkpoint", dest="bundle", help="model bundle directory")
    bench.add_argument("--policy-stub", action="store_true", help="time the stub policy (no bundle)")
    bench.add_argument("--iterations", type=int, default=1000)
    bench.add_argument("--warmup", type=int, default=50)
    bench.add_argument("--threads", type=int, default=0, help="inference threads, 0 = all cores")
    bench.add_argument("--engine", default="auto")
    bench.add_argument("--frame-size", default="640x480", help="camera frame WxH fed to preprocessing")
    bench.add_argument(
        "--config",
        type=Path,
        help="the car's runtime config, for the driving measurement (default: the active release's, "
        f"{ACTIVE_CONFIG}, when it exists; without one only inference is timed)",
    )
    bench.add_argument(
        "--drive-s",
        type=float,
        default=10.0,
        help="seconds of driving at the control rate through the config's cameras and serial line, after a "
        "2 s warm-up (0 = skip); the commands written are neutral unless --live",
    )
    bench.add_argument(
        "--live", action="store_true", help="while driving, send the policy's commands: THE CAR MOVES"
    )
    bench.add_argument("--output", type=Path, help="also write the JSON here (atomically)")

    check = sub.add_parser(
        "check", help="self-test: bundle, one inference, serial, thermal; JSON + exit status"
    )
    check.add_argument("--config", type=Path, help="TOML config file for defaults")
    check.add_argument(
        "--bundle", "--checkpoint", dest="bundle", help="model bundle directory (default: policy.bundle)"
    )
    check.add_argument("--serial-port", "--arduino_port", dest="serial_port", help="(default: serial.port)")
    check.add_argument(
        "--deadline-ms", type=float, default=500.0, help="one inference must finish within this"
    )
    check.add_argument("--max-temp-c", type=float, default=80.0, help="fail above this SoC temperature")
    check.add_argument("--skip-serial", action="store_true", help="do not test the serial device")
    check.add_argument(
        "--cameras",
        action="store_true",
        help="also capture from every camera for a second (real frame rate, frame age); needs the devices, "
        "so not while the service runs",
    )
    check.add_argument("--threads", type=int, help="inference threads")
    check.add_argument("--engine", help="quantized engine")
    check.add_argument("--output", type=Path, help="also write the JSON here (atomically)")

    firmware = sub.add_parser(
        "firmware", help="the Arduino's firmware: identify it, check a release's, or flash it"
    )
    fw_sub = firmware.add_subparsers(dest="firmware_command", required=True)
    identify = fw_sub.add_parser("identify", help="ping the firmware (resets the board); JSON")
    fw_check = fw_sub.add_parser(
        "check", help="check a firmware directory against this runtime and a board (no board touched); JSON"
    )
    flash = fw_sub.add_parser(
        "flash", help="flash a firmware directory with avrdude unless the board runs it; JSON + exit status"
    )
    for p in (identify, flash):
        p.add_argument(
            "--config",
            type=Path,
            help="a runtime.toml: its serial.port and serial.baudrate (over --port, --baud)",
        )
        p.add_argument("--port", default="/dev/rover-arduino", help="the Arduino's serial device")
        p.add_argument("--baud", type=int, default=115200, help="the firmware's line speed (serial.baudrate)")
    for p in (identify, fw_check, flash):
        p.add_argument("--output", type=Path, help="also write the JSON here (atomically)")
    for p in (fw_check, flash):
        p.add_argument("--firmware", type=Path, required=True, help="directory: rover_car.hex, firmware.json")
        p.add_argument(
            "--board",
            help="the car's board (default: the one the firmware is built for): "
            + ", ".join(sorted(_boards())),
        )
    flash.add_argument("--attempts", type=int, default=2, help="avrdude runs before giving up")
    flash.add_argument("--force", action="store_true", help="flash even if the board runs this version")
    flash.add_argument("--avrdude", default="avrdude", help="the avrdude program")
    return parser


def _boards() -> list[str]:
    from rover_runtime.firmware import BOARDS  # noqa: PLC0415

    return list(BOARDS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "benchmark":
        return _cmd_benchmark(args)
    if args.command == "firmware":
        return _cmd_firmware(args)
    return _cmd_check(args)


# --- firmware ----------------------------------------------------------------------------------------


def _cmd_firmware(args: argparse.Namespace) -> int:
    """identify: the firmware's answer ({"answer": null} when nothing answers; exit 1). check: the image as
    this runtime and the board would take it (exit 2 naming why not). flash: the result of
    rover_runtime.firmware.flash (exit 1 if it failed). What is refused before the board is touched is one
    line on stderr and exit 2, also written to --output as {"ok": false, "refused": ...}."""
    from rover_runtime import firmware  # noqa: PLC0415
    from rover_runtime.metrics import write_json_atomic  # noqa: PLC0415

    _setup_logging("INFO", stream=sys.stderr)
    report: dict[str, Any]
    port = getattr(args, "port", "")
    try:
        if getattr(args, "config", None) is not None:
            serial_settings = load_config(args.config).serial
            port, args.baud = serial_settings.port, serial_settings.baudrate
        if args.firmware_command == "identify":
            answer = firmware.describe(firmware.identify(port, args.baud))
            report, status = {"port": port, "answer": answer}, EXIT_OK if answer else EXIT_FAILED
        elif args.firmware_command == "check":
            image = firmware.check_for_runtime(args.firmware, args.board)
            report, status = {"ok": True, **image.to_json()}, EXIT_OK
        else:
            if args.attempts < 1:
                raise firmware.FirmwareError(f"--attempts must be >= 1, got {args.attempts}")
            result = firmware.flash(
                port, args.board, args.firmware, baud=args.baud, attempts=args.attempts,
                force=args.force, avrdude=args.avrdude,
            )  # fmt: skip
            report, status = result.to_json(), EXIT_OK if result.ok else EXIT_FAILED
            if not result.ok:
                print(f"rover-runtime: flash failed: {result.error}", file=sys.stderr)
    except (ConfigError, firmware.FirmwareError) as exc:
        print(f"rover-runtime: firmware refused, the board untouched: {exc}", file=sys.stderr)
        if args.output is not None:
            write_json_atomic(args.output, {"ok": False, "refused": str(exc), "port": port})
        return EXIT_BAD_INPUT
    if args.output is not None:
        write_json_atomic(args.output, report)
    print(json.dumps(report, indent=2))
    return status


# --- run ---------------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"rover-runtime: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.max_cycles is not None and args.max_cycles <= 0:
        print(f"rover-runtime: --max-cycles must be > 0, got {args.max_cycles}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _setup_logging(config.logging.level)
    return run_runtime(config, max_cycles=args.max_cycles)


def run_runtime(config: RuntimeConfig, max_cycles: int | None = None) -> int:
    """Load the policy and match its inputs to the car (a bad bundle, or one asking for a camera or state the
    car cannot supply, is refused before the serial line is touched), identify the firmware (another
    protocol version, or a missing sensor, is refused), then drive."""
    from rover_runtime import protocol  # noqa: PLC0415 - keep `--help` fast
    from rover_runtime.drive import InputError, build_vehicle, plan_inputs  # noqa: PLC0415
    from rover_runtime.metrics import MetricsWriter  # noqa: PLC0415
    from rover_runtime.parts.car import missing_features  # noqa: PLC0415
    from rover_runtime.policy import Policy, PolicyError, StubPolicy, load_policy  # noqa: PLC0415
    from rover_runtime.sd_notify import Notifier  # noqa: PLC0415
    from rover_runtime.vehicle import Vehicle  # noqa: PLC0415

    stop = threading.Event()
    holder: list[Vehicle] = []

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping (neutral, close, exit 0)", signal.Signals(signum).name)
        stop.set()
        for vehicle in holder:
            vehicle.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    notifier = Notifier()
    notifier.status("loading policy")
    policy: Policy
    if config.policy.stub:
        policy = StubPolicy(
            chunk_size=config.policy.stub_chunk_size, latency_s=config.policy.stub_latency_ms / 1000
        )
        log.info(
            "stub policy: chunk %d, %.1f ms per inference",
            config.policy.stub_chunk_size,
            config.policy.stub_latency_ms,
        )
    else:
        try:
            policy = load_policy(config.policy.bundle, config.policy.engine, config.policy.threads)
        except (BundleError, PolicyError) as exc:
            return _refuse(f"refusing the bundle, the car stays untouched: {exc}")
        log.info(
            "policy loaded: %s %s engine=%s threads=%d, cameras %s, state %s",
            policy.info.backend,
            policy.info.mode,
            policy.info.engine,
            policy.info.threads,
            ", ".join(policy.info.image_keys),
            ", ".join(policy.info.state_names),
        )
    try:
        plan = plan_inputs(config, policy.info.image_keys, policy.info.state_names)
    except InputError as exc:
        return _refuse(f"refusing the bundle, the car stays untouched: {exc}")
    if stop.is_set():
        return EXIT_OK

    link = make_serial_link(config.serial)
    notifier.status("identifying the firmware")
    firmware = link.ping(timeout_s=IDENTIFY_TIMEOUT_S)
    if firmware is None:
        log.warning(
            "the firmware on %s did not identify itself within %.0f s; not driving until it does",
            config.serial.port,
            IDENTIFY_TIMEOUT_S,
        )
    elif firmware.protocol != protocol.PROTOCOL_VERSION:
        link.close()
        return _refuse(
            f"the firmware on {config.serial.port} ({firmware.describe()}) speaks protocol "
            f"{firmware.protocol}, this runtime {protocol.PROTOCOL_VERSION}: flash firmware/rover_car from "
            "this release (make -C firmware upload); not driving"
        )
    elif missing := missing_features(plan.needed_features, firmware):
        link.close()
        return _refuse(f"the car cannot supply the bundle's inputs: {'; '.join(missing)}; not driving")
    vehicle = build_vehicle(config, policy, link, plan=plan, notifier=notifier)
    holder.append(vehicle)
    metrics = (
        MetricsWriter(
            Path(config.metrics.path) if config.metrics.path else None,
            vehicle.snapshot,
            config.metrics.interval_s,
            textfile=Path(config.metrics.textfile) if config.metrics.textfile else None,
        )
        if config.metrics.path or config.metrics.textfile
        else None
    )
    try:
        if metrics is not None:
            metrics.start()
        if stop.is_set():
            vehicle.request_stop()
        log.info("control loop at %g Hz", config.control.rate_hz)
        vehicle.run(max_cycles=max_cycles)
    finally:
        link.close()
        if metrics is not None:
            metrics.close()
        notifier.close()
        log.info(
            "stopped after %d cycles: %d deadline misses, %d failsafes",
            vehicle.cycles,
            vehicle.deadline_misses,
            vehicle.failsafe_count,
        )
    return EXIT_OK


def _refuse(message: str) -> int:
    log.error("%s", message)
    print(f"rover-runtime: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# --- benchmark / check -------------------------------------------------------------------------------


def _emit(report: dict[str, Any], output: Path | None) -> None:
    from rover_runtime.metrics import write_json_atomic  # noqa: PLC0415

    print(json.dumps(report, indent=2, sort_keys=True))
    if output is not None:
        write_json_atomic(output, report)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from rover_runtime.benchmark import run_benchmark  # noqa: PLC0415
    from rover_runtime.drive import InputError  # noqa: PLC0415
    from rover_runtime.policy import PolicyError  # noqa: PLC0415

    _setup_logging("WARNING", sys.stderr)  # stdout is the JSON report
    if (args.bundle is None) == (not args.policy_stub):
        print("rover-runtime benchmark: give exactly one of --bundle DIR or --policy-stub", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        width, height = (int(v) for v in args.frame_size.lower().split("x"))
    except ValueError:
        print(f"rover-runtime benchmark: --frame-size must be WxH, got {args.frame_size!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for name in ("iterations", "warmup", "threads", "drive_s"):
        minimum = 1 if name == "iterations" else 0
        if getattr(args, name) < minimum:
            flag = name.replace("_", "-")
            print(f"rover-runtime benchmark: --{flag} must be >= {minimum}", file=sys.stderr)
            return EXIT_BAD_INPUT
    config_path = args.config or (ACTIVE_CONFIG if ACTIVE_CONFIG.is_file() else None)
    drive_config = None
    if config_path is not None and args.drive_s > 0:
        overrides: dict[str, Any] = {"policy.threads": args.threads, "policy.engine": args.engine}
        if args.bundle is not None:
            overrides["policy.bundle"] = args.bundle
        try:
            drive_config = load_config(config_path, overrides)
        except ConfigError as exc:
            print(f"rover-runtime benchmark: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if drive_config is not None and (running := _running_runtime(Path(drive_config.metrics.path))):
        print(
            f"rover-runtime benchmark: the car's runtime is running ({running}): stop it first "
            "(systemctl stop rover-runtime), or pass --drive-s 0 to time inference only",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        report = run_benchmark(
            args.bundle,
            iterations=args.iterations,
            warmup=args.warmup,
            threads=args.threads,
            engine=args.engine,
            frame_size=(width, height),
            drive_config=drive_config,
            drive_s=args.drive_s,
            live=args.live,
        )
    except (BundleError, PolicyError, InputError) as exc:
        print(f"rover-runtime benchmark: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _emit(report, args.output)
    return EXIT_OK


def _running_runtime(metrics_path: Path) -> str | None:
    """ "pid N, metrics PATH" when a runtime process that wrote `metrics_path` in the last 5 s is alive."""
    try:
        data = json.loads(metrics_path.read_text())
        pid, written = int(data["pid"]), float(data["time_unix"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if time.time() - written > 5.0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return f"pid {pid}, metrics {metrics_path}"


def _cmd_check(args: argparse.Namespace) -> int:
    from rover_runtime.check import run_check  # noqa: PLC0415

    _setup_logging("WARNING", sys.stderr)  # stdout is the JSON report
    overrides: dict[str, Any] = {}
    if args.bundle is not None:
        overrides["policy.bundle"] = args.bundle
    if args.serial_port is not None:
        overrides["serial.port"] = args.serial_port
    if args.threads is not None:
        overrides["policy.threads"] = args.threads
    if args.engine is not None:
        overrides["policy.engine"] = args.engine
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"rover-runtime check: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = run_check(
        config,
        deadline_ms=args.deadline_ms,
        max_temp_c=args.max_temp_c,
        test_serial=not args.skip_serial,
        test_camera=args.cameras,
    )
    _emit(report, args.output)
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
