"""A fleet for the length of a `with` block, and a free loopback port: what test fixtures (pytest, molecule)
and benchmarks build on."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from simfleet.errors import SimFleetError
from simfleet.fleet import FleetConfig, down, up
from simfleet.image import DEFAULT_RELEASE
from simfleet.paths import fleet_dir
from simfleet.state import FleetState


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the kernel's choice, released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fleet_lock(name: str) -> Iterator[None]:
    """Holds `$ROVER_CACHE/fleets/<name>.lock` so two test sessions never share (and stop) one fleet."""
    path = fleet_dir(name).with_name(f"{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise SimFleetError(
                f"fleet {name!r} is in use by another test session (pid {lock.read().strip() or '?'})"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def running_fleet(
    name: str,
    *,
    hosts: int = 2,
    arch: str = "amd64",
    base_port: int = 2321,
    inventory: Path | None = None,
    releases: str | Sequence[str] = (DEFAULT_RELEASE,),
    kind: str = "nspawn",
    arduino: str = "sim",
) -> Iterator[FleetState]:
    """Boots a fleet (after stopping leftovers of the same name from an interrupted run) and stops it at
    the end. The inventory defaults to `$ROVER_CACHE/fleets/<name>/hosts.yml`, outside the repo.
    `releases` ("trixie", or ("trixie", "bookworm") for a mixed fleet) go to car1, car2, ... in turn;
    `kind` "vm" makes them virtual machines; `arduino` "board" gives each a simulated Uno that runs the
    sketch (simfleet.board)."""
    with fleet_lock(name):
        down(name)
        config = FleetConfig(
            name=name,
            hosts=hosts,
            arch=arch,
            base_port=base_port,
            inventory=inventory or fleet_dir(name) / "hosts.yml",
            releases=(releases,) if isinstance(releases, str) else tuple(releases),
            kind=kind,
            arduino=arduino,
        )
        state = up(config)
        try:
            yield state
        finally:
            down(name)
