"""sd_notify over a real unix datagram socket, as systemd's Type=notify listener receives it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from rover_runtime.sd_notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    yield sock, path
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    out = []
    sock.settimeout(0.05)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except TimeoutError:
        return out


def test_ready_status_and_watchdog_only_when_healthy(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == pytest.approx(0.2)
    assert notifier.ready("driving")
    assert notifier.status("hello")
    assert notifier.watchdog(10.0, healthy=True)
    assert not notifier.watchdog(10.05, healthy=True)  # pings at half the interval, not more often
    assert not notifier.watchdog(10.2, healthy=False)  # unhealthy: no ping
    assert notifier.watchdog(10.3, healthy=True)
    notifier.close()
    assert _received(sock) == ["READY=1\nSTATUS=driving", "STATUS=hello", "WATCHDOG=1", "WATCHDOG=1"]


def test_watchdog_for_another_pid_is_ignored(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval_s is None
    assert not notifier.watchdog(1.0, healthy=True)


def test_abstract_socket_address() -> None:
    name = f"rover-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        sock.settimeout(1.0)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_without_systemd_everything_is_a_noop() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog(0.0, healthy=True)


def test_unreachable_socket_is_reported_not_raised(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready()
