"""python -m simfleet up|down|status|poweroff|poweron|unplug|plug|set-thermal|transmitter|ssh: a fleet of
simulated cars on this machine (containers, or virtual machines with their own kernel)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

from simfleet.errors import SimFleetError
from simfleet.fleet import (
    ARDUINOS,
    DEVICES,
    KINDS,
    FleetConfig,
    Transmitter,
    down,
    plug,
    power_off,
    power_on,
    require_state,
    set_thermal,
    set_transmitter,
    status,
    target_for,
    unplug,
    up,
)
from simfleet.image import DEFAULT_RELEASE, RELEASES
from simfleet.pi_tools import ThermalReading
from simfleet.ssh import ssh_run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad options: one line, `simfleet: error: ...`, exit status 2 (as for every other error)."""
        self.exit(2, f"simfleet: error: {message}\n")


def _releases(text: str) -> list[str]:
    """`--release trixie` or a comma list `trixie,bookworm`."""
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in RELEASES:
            raise argparse.ArgumentTypeError(
                f"unknown release {name!r}: choose from {', '.join(RELEASES)} (or a comma list of them)"
            )
    return names


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m simfleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p_up = sub.add_parser("up", help="build the image (once), boot the hosts, write the inventory")
    p_up.add_argument("--name", default="sim", help="fleet name (several fleets can run side by side)")
    p_up.add_argument("--hosts", type=int, default=2, help="number of cars (default 2)")
    p_up.add_argument(
        "--arch", default="amd64", choices=["amd64", "arm64"], help="arm64 runs under qemu-user"
    )
    p_up.add_argument(
        "--kind",
        default="nspawn",
        choices=KINDS,
        help="nspawn (default, fast): containers on the controller's kernel; vm: QEMU virtual machines with "
        "Debian's kernel, udev, a USB-serial Arduino and a V4L2 camera",
    )
    p_up.add_argument(
        "--release",
        type=_releases,
        action="append",
        metavar="{" + ",".join(RELEASES) + "}",
        help=f"Debian release of the cars (default {DEFAULT_RELEASE}, what Raspberry Pi OS is based on); "
        "repeat it or give a comma list for a mixed fleet: car1, car2, ... take them in turn",
    )
    p_up.add_argument("--base-port", type=int, default=2221, help="sshd port of car1; car N gets base+N-1")
    p_up.add_argument("--inventory", type=Path, default=Path("inventory/sim/hosts.yml"))

    p_up.add_argument(
        "--arduino",
        default="sim",
        choices=ARDUINOS,
        help="each car's Arduino: sim (default, fast: the firmware simulator) or board (the compiled "
        "sketch on a simulated Uno with Optiboot, which deploys flash with avrdude; container cars)",
    )
    p_up.add_argument(
        "--transmitter",
        action="store_true",
        help="give each car's firmware an RC receiver, its transmitter in autopilot (see `transmitter`)",
    )

    p_tx = sub.add_parser("transmitter", help="what a car's simulated driver does with the transmitter")
    p_tx.add_argument("--name", default="sim")
    p_tx.add_argument("host", help="car1, car2, ... or all (every car of the fleet)")
    p_tx.add_argument("mode", choices=["manual", "autopilot", "autopilot_neutral", "off"])
    p_tx.add_argument("--steering", type=float, default=0.0, help="the steering stick, -1..1 (manual)")
    p_tx.add_argument("--throttle", type=float, default=0.0, help="the throttle stick, -1..1 (manual)")

    p_off = sub.add_parser("poweroff", help="shut one car down (its disk is kept); --hard: pull its battery")
    p_off.add_argument("--name", default="sim")
    p_off.add_argument("host", help="car1, car2, ...")
    p_off.add_argument(
        "--hard", action="store_true", help="a power cut: stop at once, nothing not yet on its disk survives"
    )
    p_on = sub.add_parser("poweron", help="boot a car that was switched off, from its disk")
    p_on.add_argument("--name", default="sim")
    p_on.add_argument("host", help="car1, car2, ...")

    for verb, what in (("unplug", "pull a VM car's Arduino or camera"), ("plug", "plug it back in")):
        p_dev = sub.add_parser(verb, help=what)
        p_dev.add_argument("--name", default="sim")
        p_dev.add_argument("host", help="car1, car2, ...")
        p_dev.add_argument("device", choices=DEVICES)

    p_down = sub.add_parser("down", help="stop every process of the fleet and remove its hosts")
    p_down.add_argument("--name", default="sim")

    p_status = sub.add_parser("status", help="per host: running, ssh, serial, firmware simulator")
    p_status.add_argument("--name", default="sim")
    p_status.add_argument("--json", action="store_true", help="print JSON")

    p_thermal = sub.add_parser("set-thermal", help="choose what a host's vcgencmd reports")
    p_thermal.add_argument("--name", default="sim")
    p_thermal.add_argument("host", help="car1, car2, ...")
    p_thermal.add_argument("--temp", type=float, required=True, help="°C, e.g. 85")
    p_thermal.add_argument("--throttled", default="0x0", help="get_throttled bits, e.g. 0x50005")

    p_ssh = sub.add_parser("ssh", help="run a command on a host as pi")
    p_ssh.add_argument("--name", default="sim")
    p_ssh.add_argument("host")
    p_ssh.add_argument("remote", nargs=argparse.REMAINDER, help="command (after --)")
    return parser


def _print_status(report: dict[str, object]) -> None:
    if not report["hosts"]:
        print(f"fleet {report['name']}: not up")
        return
    print(f"fleet {report['name']} ({report['arch']} {report['kind']}), inventory {report['inventory']}")
    for h in report["hosts"]:  # type: ignore[attr-defined]
        fw = h["firmware_status"]
        fw_text = json.dumps(fw) if isinstance(fw, dict) else str(fw)
        print(
            f"  {h['host']:<6} {h['release']:<8} port {h['port']}  running={h['running']} ssh={h['ssh']} "
            f"serial={h['serial']} firmware_sim={h['firmware_sim']}"
            + (f" accelerator={h['accelerator']}" if h["accelerator"] else "")
            + f" status={fw_text[:120]}"
        )


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="simfleet: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "up":
        config = FleetConfig(
            name=args.name,
            hosts=args.hosts,
            arch=args.arch,
            base_port=args.base_port,
            inventory=args.inventory,
            releases=tuple(r for group in args.release or [[DEFAULT_RELEASE]] for r in group),
            transmitter=args.transmitter,
            kind=args.kind,
            arduino=args.arduino,
        )
        state = up(config)
        boots = ", ".join(f"{h.name} {h.release} {h.boot_seconds} s" for h in state.hosts)
        summary = f"{len(state.hosts)} {state.arch} hosts ({boots}); inventory {state.inventory}"
        print(f"fleet {state.name} up: {summary}")
    elif args.command == "down":
        killed = down(args.name)
        print(f"fleet {args.name} down" + (f" (had to kill: {', '.join(killed)})" if killed else ""))
    elif args.command == "status":
        report = status(args.name)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_status(report)
        return 0 if report["hosts"] and report["up"] else 1
    elif args.command == "poweroff":
        killed = power_off(args.name, args.host, hard=args.hard)
        how = "power cut" if args.hard else "shut down"
        print(f"{args.host} off ({how})" + (f"; killed: {', '.join(killed)}" if killed else ""))
    elif args.command in ("unplug", "plug"):
        (unplug if args.command == "unplug" else plug)(args.name, args.host, args.device)
        print(f"{args.host}: {args.device} {args.command}ged")
    elif args.command == "poweron":
        host = power_on(args.name, args.host)
        print(f"{host.name} on: sshd answers after {host.boot_seconds} s")
    elif args.command == "transmitter":
        set_transmitter(args.name, args.host, Transmitter(args.mode, args.steering, args.throttle))
    elif args.command == "set-thermal":
        set_thermal(args.name, args.host, ThermalReading(temp_c=args.temp, throttled=args.throttled))
    elif args.command == "ssh":
        state = require_state(args.name)
        remote = args.remote[1:] if args.remote[:1] == ["--"] else args.remote
        result = ssh_run(target_for(state, state.host(args.host)), remote or ["true"], timeout=600)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except SimFleetError as err:
        print(f"simfleet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
