"""The wheelhouse over HTTP, both ends as the role runs them (real processes, real HTTP): the controller's
server (roles/rover_python/files/serve_wheelhouses.py) and the car's fetcher
(plugins/module_utils/wheelhouse_fetch.py, under the module rover_wheelhouse_fetch). What the car refuses
never lands in its wheelhouse; a cut-off download leaves nothing half-written. On cars:
tests/integration/test_provision.py."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

FILES = Path(__file__).resolve().parents[2] / "roles" / "rover_python" / "files"
SERVE = FILES / "serve_wheelhouses.py"
FETCH = Path(__file__).resolve().parents[2] / "plugins" / "module_utils" / "wheelhouse_fetch.py"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheelhouse(root: Path) -> dict[str, str]:
    """root/plat/cp313-x/: three wheels, SHA256SUMS, requirements.txt; returns the two lists' hashes."""
    house = root / "plat" / "cp313-x"
    house.mkdir(parents=True)
    wheels = {f"pkg{i}-1.0-py3-none-any.whl": os.urandom(300_000 + i) for i in range(3)}
    for name, data in wheels.items():
        (house / name).write_bytes(data)
    sums = "".join(f"{sha256(data)}  {name}\n" for name, data in sorted(wheels.items())).encode()
    requirements = "".join(f"{n.split('-')[0]}==1.0 --hash=sha256:{sha256(d)}\n" for n, d in wheels.items())
    (house / "SHA256SUMS").write_bytes(sums)
    (house / "requirements.txt").write_text(requirements)
    return {"sums": sha256(sums), "requirements": sha256(requirements.encode())}


def start_server(
    root: Path, ready: Path, idle_exit: float, first_request_exit: float = 3600, run_pid: int | None = None
) -> subprocess.Popen[str]:
    """serve_wheelhouses.py as provisioning starts it, on loopback."""
    return subprocess.Popen(
        [
            sys.executable,
            str(SERVE),
            f"--root={root}",
            "--bind=127.0.0.1",
            f"--ready-file={ready}",
            f"--idle-exit={idle_exit}",
            f"--first-request-exit={first_request_exit}",
            *([f"--run-pid={run_pid}"] if run_pid is not None else []),
        ],
        text=True,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[str]]]:
    """serve_wheelhouses.py on a throwaway wheelhouse root: (root, base URL, process)."""
    root = tmp_path / "wheelhouses"
    root.mkdir()
    ready = tmp_path / "ready.json"
    proc = start_server(root, ready, idle_exit=60)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert proc.poll() is None, "the server exited before it listened"
        assert time.monotonic() < deadline, "the server did not write its ready file"
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    try:
        yield root, f"http://127.0.0.1:{info['port']}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def fetch(
    url: str, dest: Path, hashes: dict[str, str], timeout: float = 10
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(FETCH),
            f"--url={url}",
            f"--dest={dest}",
            f"--sums-sha256={hashes['sums']}",
            f"--requirements-sha256={hashes['requirements']}",
            f"--timeout={timeout}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def listing(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_fetches_only_what_the_car_lacks(server: tuple[Path, str, Any], tmp_path: Path) -> None:
    root, base, _ = server
    hashes = make_wheelhouse(root)
    dest = tmp_path / "car" / "cp313-x"
    done = fetch(f"{base}/plat/cp313-x", dest, hashes)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fetched"] == 3
    house = root / "plat" / "cp313-x"
    assert listing(dest) == listing(house)
    assert all((dest / n).read_bytes() == (house / n).read_bytes() for n in listing(house))
    check = ["sha256sum", "--check", "--strict", "--quiet", "SHA256SUMS"]
    assert subprocess.run(check, cwd=dest, check=False).returncode == 0
    # Unchanged: nothing moves. One wheel lost: only that one.
    assert json.loads(fetch(f"{base}/plat/cp313-x", dest, hashes).stdout) == {"fetched": 0, "bytes": 0}
    (dest / "pkg1-1.0-py3-none-any.whl").unlink()
    again = json.loads(fetch(f"{base}/plat/cp313-x", dest, hashes).stdout)
    assert again == {"fetched": 1, "bytes": 300_001}


def test_a_changed_wheel_on_the_server_is_refused(server: tuple[Path, str, Any], tmp_path: Path) -> None:
    root, base, _ = server
    hashes = make_wheelhouse(root)
    victim = root / "plat" / "cp313-x" / "pkg2-1.0-py3-none-any.whl"
    victim.write_bytes(victim.read_bytes() + b"!")
    dest = tmp_path / "car"
    done = fetch(f"{base}/plat/cp313-x", dest, hashes)
    assert done.returncode == 1
    assert "pkg2-1.0-py3-none-any.whl from" in done.stderr
    assert "refused" in done.stderr
    assert "Traceback" not in done.stderr
    # The good wheels are in place; not the bad one, a partial file or SHA256SUMS (the "complete" mark).
    assert listing(dest) == ["pkg0-1.0-py3-none-any.whl", "pkg1-1.0-py3-none-any.whl"]


@pytest.mark.parametrize("which", ["sums", "requirements"])
def test_lists_that_are_not_the_controllers_are_refused(
    server: tuple[Path, str, Any], tmp_path: Path, which: str
) -> None:
    root, base, _ = server
    hashes = make_wheelhouse(root)
    hashes[which] = sha256(b"what the controller computed")
    dest = tmp_path / "car"
    done = fetch(f"{base}/plat/cp313-x", dest, hashes)
    assert done.returncode == 1
    name = "SHA256SUMS" if which == "sums" else "requirements.txt"
    assert f"{name} from {base}/plat/cp313-x is not the controller's" in done.stderr
    assert listing(dest) == []  # nothing downloaded on the word of an unchecked list


class CutShort(BaseHTTPRequestHandler):
    """Serves the lists, and promises each wheel's full length but hangs up half-way (the Wi-Fi dropped)."""

    def __init__(self, *args: Any, house: Path, **kwargs: Any) -> None:
        self.house = house
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        data = (self.house / self.path.rsplit("/", 1)[-1]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        half = data if self.path.endswith(("SHA256SUMS", "requirements.txt")) else data[: len(data) // 2]
        self.wfile.write(half)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_download_cut_short_leaves_nothing_half_written(
    server: tuple[Path, str, Any], tmp_path: Path
) -> None:
    root, base, _ = server
    hashes = make_wheelhouse(root)
    house = root / "plat" / "cp313-x"
    flaky = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CutShort, house=house))
    threading.Thread(target=flaky.serve_forever, daemon=True).start()
    dest = tmp_path / "car"
    try:
        done = fetch(f"http://127.0.0.1:{flaky.server_address[1]}/plat/cp313-x", dest, hashes, timeout=5)
    finally:
        flaky.shutdown()
        flaky.server_close()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "pkg0-1.0-py3-none-any.whl" in done.stderr
    assert listing(dest) == []  # no partial file, no SHA256SUMS
    # The next run, with the link back, fetches everything and checks it.
    done = fetch(f"{base}/plat/cp313-x", dest, hashes)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fetched"] == 3


def test_an_unreachable_controller_is_one_clear_sentence(tmp_path: Path) -> None:
    done = fetch(
        "http://127.0.0.1:9/plat/cp313-x", tmp_path / "car", {"sums": "0" * 64, "requirements": "0" * 64}
    )
    assert done.returncode == 1
    assert "cannot fetch the wheelhouse from http://127.0.0.1:9/plat/cp313-x" in done.stderr
    assert "rover_python_wheelhouse_transfer=copy" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_server_serves_files_only_and_stops_when_told(
    server: tuple[Path, str, Any], tmp_path: Path
) -> None:
    root, base, proc = server
    make_wheelhouse(root)
    with urllib.request.urlopen(f"{base}/plat/cp313-x/SHA256SUMS", timeout=5) as response:
        assert response.read() == (root / "plat" / "cp313-x" / "SHA256SUMS").read_bytes()
    with pytest.raises(urllib.error.HTTPError) as listing_error:
        urllib.request.urlopen(f"{base}/plat/", timeout=5)
    assert listing_error.value.code == 404
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_a_server_that_cannot_listen_says_why(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SERVE), f"--root={tmp_path / 'missing'}", f"--ready-file={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "is not a directory" in done.stderr


def test_the_idle_limit_counts_from_the_first_request_not_from_the_start(tmp_path: Path) -> None:
    """A slow car fetches long after the run started the server: without any request the server waits
    --first-request-exit; after one, --idle-exit without another stops it; and with none it stops too."""
    root = tmp_path / "wheelhouses"
    root.mkdir()
    (root / "a.txt").write_text("a")
    ready = tmp_path / "ready.json"
    proc = start_server(root, ready, idle_exit=1, first_request_exit=60)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        time.sleep(3)  # three idle limits without a request: still serving
        assert proc.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/a.txt", timeout=10) as answer:
            assert answer.read() == b"a"
        assert proc.wait(timeout=30) == 0  # then one idle limit after it
        assert not ready.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lonely = start_server(root, tmp_path / "ready2.json", idle_exit=60, first_request_exit=1)
    try:
        assert lonely.wait(timeout=30) == 0  # nobody came: an interrupted run's server stops
    finally:
        if lonely.poll() is None:
            lonely.kill()
            lonely.wait()


def test_the_server_stops_when_its_run_ends(tmp_path: Path) -> None:
    """A provisioning run stopped by Ctrl-C never reaches the task that stops its server: with --run-pid
    (the run's ansible-playbook, here a stand-in process) the server stops, removing its ready file, within
    seconds of that process ending, long before its idle limits; a run pid that is not running is refused."""
    root = tmp_path / "wheelhouses"
    root.mkdir()
    ready = tmp_path / "ready.json"
    run = subprocess.Popen(["sleep", "600"])
    proc = start_server(root, ready, idle_exit=600, first_request_exit=600, run_pid=run.pid)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, "the server exited before it listened"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2)
        assert proc.poll() is None, "the server stopped while its run was still going"
        run.kill()
        run.wait()
        assert proc.wait(timeout=15) == 0
        assert not ready.exists()
    finally:
        for p in (run, proc):
            if p.poll() is None:
                p.kill()
                p.wait()
    gone = run.pid
    refused = subprocess.run(
        [
            sys.executable,
            str(SERVE),
            f"--root={root}",
            f"--ready-file={tmp_path / 'r2'}",
            f"--run-pid={gone}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1
    assert f"--run-pid {gone} is not a running process" in refused.stderr
    assert not (tmp_path / "r2").exists()
