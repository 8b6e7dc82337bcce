"""How fast a car switched off during a publication converges to it in pull mode, in timer periods; JSON.

    python benchmarks/pull_convergence.py [--period 10min] [--boot-delay 1min] [--random-delay 2min]
                                          [--cars 2] [--base-port 2700] [--out FILE]

The issue's goal: in pull mode a car that boots after the push is on the new release within 2 timer periods.

Boots its own fleet "pullbench" (car1 trixie, car2 bookworm, then in turn), serves a publication directory
over HTTP and provisions the cars in pull mode (docs/pull.md) with the timer settings given (default: those of
roles/rover_pull/defaults/main.yml) and rover_pull_force (a simulated car always drives). Then, as
tests/integration/test_pull_mode.py does:
  1. publishes bundle A (playbooks/publish.yml) and waits until every car applied it; set-up, not measured:
     rover-pull.service is started on each car at once rather than waiting up to a period for its timer
  2. switches every car off (simfleet power_off: the battery's way, no clean shutdown), publishes bundle B and
     switches the cars on again one after the other
  3. polls each car every 2 s until its status.json (/var/lib/rover/pull/status.json) says B's publication is
     applied (or up-to-date) and its current release runs B's bundle
Per car it reports
  seconds_to_converge  from the start of its power-on (the container's boot) to the poll that saw it on B
  periods              seconds_to_converge / rover_pull_period
  boot_s               until the car's sshd answered (power_on returns)
  pull_started_s       when the pull that applied B started (status.json's checked_at, whole seconds)
  deploy_s             from then to the poll that saw it on B (the deploy the car ran on itself)
  outcome, bytes_received, release, message   what status.json says
and the goal: the slowest car within 2 periods. timer_bound_s (boot delay + random delay) is the latest a
booted car's first pull starts; the rest is the deploy. A car not on B within 4 periods + 10 min of its
power-on stops the benchmark with an error (the report so far is still printed, with "error").

Concessions as in benchmarks/fleet_scale.py (its SETTINGS: no torch on the cars, light running cars), in the
deploys the cars run themselves as well (rover_pull_extra_vars). The cars share this machine's
cores, so run it on a quiet machine: the load average at the start and at the end is in the report.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from deploy_helpers import car, make_bundle, run_playbook  # noqa: E402

# The pull tests' set-up and checks (a helper module for mypy: pyproject.toml).
from test_pull_mode import (  # noqa: E402
    PullFleet,
    QuietHandler,
    _bytes_received,
    _on,
    _status,
    update_repository,
)

from benchmarks.fleet_scale import SETTINGS, emit  # noqa: E402
from simfleet.errors import SimFleetError  # noqa: E402
from simfleet.fleet import power_off, power_on  # noqa: E402
from simfleet.testing import running_fleet  # noqa: E402

FLEET = "pullbench"
RELEASES = ("trixie", "bookworm")
PULL_DEFAULTS = REPO / "roles" / "rover_pull" / "defaults" / "main.yml"
POLL_S = 2.0
GOAL_PERIODS = 2
# systemd.time(7) time span units, in seconds.
UNITS = {
    **dict.fromkeys(("us", "usec"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 1e-3),
    **dict.fromkeys(("", "s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}


def span_seconds(span: str) -> float:
    """A systemd time span ("10min", "1min 30s", "90") in seconds."""
    text = span.strip().lower()
    parts = re.findall(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if not text or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"not a systemd time span: {span!r}")
    if any(unit not in UNITS for _, unit in parts):
        raise ValueError(f"unknown unit in the time span {span!r}")
    return sum(float(number) * UNITS[unit] for number, unit in parts)


def timespan(value: str) -> str:
    """argparse type: a systemd time span, kept as written (it goes to the timer unit)."""
    try:
        span_seconds(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def role_defaults() -> dict[str, Any]:
    return dict(yaml.safe_load(PULL_DEFAULTS.read_text()))


def pull_journal(host: Any) -> str:
    return str(host.run("journalctl -u rover-pull --no-pager -n 30").stdout)


class NotConverged(Exception):
    pass


def wait_all(
    pull: PullFleet,
    names: list[str],
    bundle: str,
    publication: str,
    *,
    since: dict[str, float],
    timeout: float,
) -> dict[str, tuple[float, dict[str, Any]]]:
    """Polls every car every POLL_S until each is on `bundle`'s publication; per car the seconds since its
    `since` (time.monotonic()) when seen there, and its status.json then."""
    done = _on(pull, bundle, publication)
    hosts = {name: car(pull.inventory, name) for name in names}
    seen: dict[str, tuple[float, dict[str, Any]]] = {}
    last: dict[str, Any] = {}
    while True:
        for name in names:
            if name in seen:
                continue
            try:
                status = _status(hosts[name])
                ok = done(hosts[name], status)
            except Exception as exc:  # the car's sshd or a command failed: the next poll tries again
                last[name] = f"poll failed: {exc}"
                continue
            last[name] = status
            if ok:
                seen[name] = (time.monotonic() - since[name], status)
                print(f"{name}: on {bundle} after {seen[name][0]:.0f} s", file=sys.stderr, flush=True)
        late = [n for n in names if n not in seen and time.monotonic() - since[n] > timeout]
        if late:
            details = "\n".join(f"{n}: last status {last.get(n)}\n{pull_journal(hosts[n])}" for n in late)
            raise NotConverged(
                f"{', '.join(late)} not on bundle {bundle} (publication {publication}) "
                f"within {timeout:.0f} s\n{details}"
            )
        if len(seen) == len(names):
            return seen
        time.sleep(POLL_S)


def measure(args: argparse.Namespace, report: dict[str, Any], work: Path) -> None:
    period_s = span_seconds(args.period)
    timer_bound_s = span_seconds(args.boot_delay) + span_seconds(args.random_delay)
    names = [f"car{i}" for i in range(1, args.cars + 1)]
    publish_dir, keys = update_repository(work)
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(publish_dir))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bundles = {"a": make_bundle(work / "a", chunk_size=10), "b": make_bundle(work / "b", chunk_size=12)}
    settings = {
        **SETTINGS,
        "rover_pull_enabled": True,
        "rover_pull_url": f"http://127.0.0.1:{server.server_address[1]}",
        "rover_pull_boot_delay": args.boot_delay,
        "rover_pull_period": args.period,
        "rover_pull_random_delay": args.random_delay,
        "rover_pull_force": True,  # a simulated car always drives
        "rover_pull_root_metadata": str(publish_dir / "metadata" / "root.json"),
        "rover_pull_car_keys_dir": str(keys / "cars"),
        # The cars' own runs render the runtime as the push does (the light cars of SETTINGS).
        "rover_pull_extra_vars": {
            key: value
            for key, value in SETTINGS.items()
            if key == "rover_python_torch_versions" or key.startswith("rover_runtime_service_")
        },
    }
    report["settings"] = {
        "cars": {name: RELEASES[i % len(RELEASES)] for i, name in enumerate(names)},
        "period": args.period,
        "period_s": period_s,
        "boot_delay": args.boot_delay,
        "random_delay": args.random_delay,
        "timer_bound_s": timer_bound_s,
        "provision": {k: v for k, v in settings.items() if k != "rover_pull_url"},
    }
    setup: dict[str, float] = {}
    report["setup_s"] = setup
    try:
        with running_fleet(FLEET, hosts=args.cars, base_port=args.base_port, releases=RELEASES) as fleet:
            inventory = Path(fleet.inventory)
            pull = PullFleet(fleet, inventory, publish_dir, keys, bundles)
            started = time.monotonic()
            run = run_playbook(inventory, "provision.yml", "-e", json.dumps(settings), timeout=3600)
            if run.rc != 0:
                raise RuntimeError(f"provision.yml failed:\n{run.report()}")
            setup["provision"] = round(time.monotonic() - started, 1)

            started = time.monotonic()
            publication_a = pull.publish("a")
            setup["publish_a"] = round(time.monotonic() - started, 1)
            started = time.monotonic()
            for name in names:  # set-up: not the timer's first period
                car(inventory, name).run("systemctl start --no-block rover-pull.service")
            wait_all(
                pull,
                names,
                "a",
                publication_a,
                since=dict.fromkeys(names, started),
                timeout=2 * period_s + timer_bound_s + 900,
            )
            setup["converge_a"] = round(time.monotonic() - started, 1)

            for name in names:
                power_off(FLEET, name)
            started = time.monotonic()
            publication_b = pull.publish("b")
            setup["publish_b"] = round(time.monotonic() - started, 1)
            report["publication_b"] = publication_b

            since: dict[str, float] = {}
            since_wall: dict[str, float] = {}
            boot_s: dict[str, float] = {}
            for name in names:
                since[name] = time.monotonic()
                since_wall[name] = time.time()
                power_on(FLEET, name)
                boot_s[name] = time.monotonic() - since[name]
            seen = wait_all(pull, names, "b", publication_b, since=since, timeout=4 * period_s + 600)

            cars: dict[str, Any] = {}
            for name, (seconds, status) in sorted(seen.items()):
                checked = datetime.datetime.strptime(status["checked_at"], "%Y-%m-%dT%H:%M:%SZ")
                pull_started = checked.replace(tzinfo=datetime.UTC).timestamp() - since_wall[name]
                cars[name] = {
                    "seconds_to_converge": round(seconds, 1),
                    "periods": round(seconds / period_s, 3),
                    "boot_s": round(boot_s[name], 1),
                    "pull_started_s": round(pull_started),
                    "deploy_s": round(seconds - pull_started),
                    "outcome": status.get("outcome"),
                    "bytes_received": _bytes_received(status),
                    "release": status.get("release"),
                    "message": status.get("message"),
                }
            report["cars"] = cars
            worst = max(c["periods"] for c in cars.values())
            report["max_periods"] = worst
            report["max_seconds"] = max(c["seconds_to_converge"] for c in cars.values())
            report["goal"] = {"within_periods": GOAL_PERIODS, "met": worst <= GOAL_PERIODS}
            report["load_average_at_end"] = os.getloadavg()
    finally:
        server.shutdown()
        server.server_close()


def main() -> int:
    defaults = role_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for option in ("period", "boot-delay", "random-delay"):
        key = "rover_pull_" + option.replace("-", "_")
        parser.add_argument(
            f"--{option}",
            type=timespan,
            default=defaults[key],
            help=f"{key}, a systemd time span (default: the role's, %(default)s)",
        )
    parser.add_argument("--cars", type=int, default=2)
    parser.add_argument("--base-port", type=int, default=2700)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if span_seconds(args.period) <= 0:
        parser.error("--period must be longer than 0 s")
    report: dict[str, Any] = {"load_average_at_start": os.getloadavg()}
    started = time.monotonic()
    code = 0
    with tempfile.TemporaryDirectory(prefix="pull-convergence-") as tmp:
        try:
            measure(args, report, Path(tmp))
        except (NotConverged, RuntimeError, AssertionError, SimFleetError) as exc:
            report["error"] = str(exc)
            report["load_average_at_end"] = os.getloadavg()
            print(f"error: {exc}", file=sys.stderr)
            code = 1
    report["seconds"] = round(time.monotonic() - started)
    emit(report, args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
