"""Pull mode on two simulated cars (trixie: Python 3.13, bookworm: 3.11), with real ansible-playbook on the
cars, real systemd timers, real HTTP and a real update repository (TUF: `python -m fleet_keys init`,
python-tuf on the cars): playbooks/publish.yml signs a publication into it, each car's rover-pull.timer
converges the car to it through the collection's deploy playbook. A car switched off during a publication
catches up after it boots; a release that fails its gate is rolled back on the car and reported; an older
publication put back on the server is refused; a server the car cannot reach ages into `stale` once the
metadata the car holds expires. The tests run in order."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    RELEASES,
    car,
    content_hash,
    current_bundle,
    current_release,
    journal,
    make_bundle,
    releases,
    run_playbook,
)

from fleet_keys.keys import KeyStore
from fleet_keys.repository import Lifetimes, Repository
from simfleet.fleet import power_off, power_on
from simfleet.ports import metrics_port
from simfleet.state import FleetState
from simfleet.testing import running_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

# Its own fleet (a timer that deploys must not run beside the other tests), beside the session's.
FLEET = f"{os.environ.get('SIMFLEET_TEST_NAME', 'pytest')}-pull"
BASE_PORT = int(os.environ.get("SIMFLEET_TEST_BASE_PORT", "2321")) + 100  # +90 is the arm64 car
CARS = ("car1", "car2")
PERIOD_S = 20
# Generous: a pull runs the whole deploy (about 150 tasks and the 10 s soak) inside a car on shared cores.
CONVERGE_S = 420


class UpdateServer(ThreadingHTTPServer):
    """The update repository's HTTP server; `down` makes it answer 503 to everything (what a car sees when
    the server is gone behind its proxy; tuf's fetcher reports it as a download error, as for no route)."""

    down = False


class QuietHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if isinstance(self.server, UpdateServer) and self.server.down:
            self.send_error(503, "the update server is down")
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class PullFleet:
    fleet: FleetState
    inventory: Path
    publish_dir: Path
    keys: Path
    bundles: dict[str, Path]
    server: UpdateServer
    # The repository's metadata files right after each publication (what a replaying server would serve).
    published: dict[str, dict[Path, bytes]] = field(default_factory=dict)

    def publish(self, bundle: str) -> str:
        run = run_playbook(
            self.inventory,
            "publish.yml",
            "-e",
            f"rover_deploy_bundle={self.bundles[bundle]}",
            "-e",
            f"rover_release_publish_dir={self.publish_dir}",
            "-e",
            f"rover_release_publish_keys={self.keys}",
        )
        assert run.rc == 0, run.report()
        publication = str(self.payload()["id"])
        self.published[publication] = self.metadata()
        return publication

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def payload(self) -> dict[str, Any]:
        """The publication the repository's newest targets metadata names."""
        target = Repository(self.publish_dir, KeyStore(self.keys)).targets().targets["publication.json"]
        path = self.publish_dir / "targets" / f"{target.hashes['sha256']}.publication.json"
        return dict(json.loads(path.read_text()))

    def metadata(self) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in (self.publish_dir / "metadata").iterdir()}


def update_repository(root: Path) -> tuple[Path, Path]:
    """<root>/publish, an update repository made as a user makes it once (docs/pull.md), and its keys."""
    publish_dir, keys = root / "publish", root / "keys"
    subprocess.run(
        [sys.executable, "-m", "fleet_keys", "--repo", str(publish_dir), "--keys", str(keys), "init"],
        env={**os.environ, "ROVER_ROOT_PASSPHRASE": "pull-mode test root key"},
        check=True,
        capture_output=True,
    )
    return publish_dir, keys


@pytest.fixture(scope="module")
def pull_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PullFleet]:
    root = tmp_path_factory.mktemp("pull")
    publish_dir, keys = update_repository(root)
    server = UpdateServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(publish_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bundles = {
        "a": make_bundle(root / "a", chunk_size=10),
        "b": make_bundle(root / "b", chunk_size=12),
        "gate-fails": make_bundle(root / "gate-fails", chunk_size=11, manifest_chunk_size=9),
    }
    try:
        with running_fleet(FLEET, hosts=2, base_port=BASE_PORT, releases=("trixie", "bookworm")) as fleet:
            inventory = Path(fleet.inventory)
            settings = {
                "rover_pull_enabled": True,
                "rover_pull_url": f"http://127.0.0.1:{server.server_address[1]}",
                "rover_pull_boot_delay": "5s",
                "rover_pull_period": f"{PERIOD_S}s",
                "rover_pull_random_delay": "3s",
                "rover_pull_force": True,  # a simulated car always drives
                "rover_pull_timeout_s": 10,
                # The gate-fails release never becomes healthy: its gate gives up after 30 s, not 90 s (the
                # good ones are healthy a few seconds after their restart).
                "rover_pull_extra_vars": {"rover_health_timeout_s": 30},
                "rover_pull_root_metadata": str(publish_dir / "metadata" / "root.json"),
                "rover_pull_car_keys_dir": str(keys / "cars"),  # where publish.yml reads them (keys/cars)
            }
            run = run_playbook(inventory, "provision.yml", "-e", json.dumps(settings), timeout=1800)
            assert run.rc == 0, run.report()
            yield PullFleet(fleet, inventory, publish_dir, keys, bundles, server)
    finally:
        server.shutdown()
        server.server_close()


def _status(host: Any) -> dict[str, Any]:
    path = "/var/lib/rover/pull/status.json"
    if not host.file(path).exists:
        return {}
    return dict(json.loads(host.file(path).content_string))


def _state(host: Any) -> dict[str, Any]:
    """What the agent keeps between runs: the publication, its outcome and attempts."""
    return dict(json.loads(host.file("/var/lib/rover/pull/state.json").content_string))


def _wait(pull: PullFleet, name: str, what: str, done: Any, timeout: float = CONVERGE_S) -> dict[str, Any]:
    host = car(pull.inventory, name)
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = _status(host)
        if done(host, status):
            return status
        time.sleep(3)
    raise AssertionError(f"{name}: {what} not within {timeout} s; pull status {status}\n{journal(host)}")


def _exported(pull: PullFleet, name: str, *wanted: str, timeout: float = 10) -> str:
    """What the car's node_exporter serves (its port on the controller: the car's ssh port + 10000), once
    every `wanted` line is in it (the agent writes its metrics just after its status file)."""
    port = metrics_port(int(car(pull.inventory, name).backend.get_variables()["ansible_port"]))
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = str(response.read().decode())
        if all(line in text for line in wanted) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _bytes_received(status: dict[str, Any]) -> int:
    """What the run that applied the publication downloaded (a later run says up-to-date and repeats it)."""
    key = "bytes_received" if status["outcome"] == "applied" else "applied_bytes_received"
    return int(status[key])


def _on(pull: PullFleet, bundle: str, publication: str) -> Any:
    wanted = content_hash(pull.bundles[bundle])

    def done(host: Any, status: dict[str, Any]) -> bool:
        return (
            status.get("publication") == publication
            and status.get("outcome") in {"applied", "up-to-date"}
            and current_bundle(host) == wanted
        )

    return done


def test_every_car_converges_to_the_publication(pull_fleet: PullFleet) -> None:
    publication = pull_fleet.publish("a")
    for name in CARS:
        status = _wait(pull_fleet, name, "publication a applied", _on(pull_fleet, "a", publication))
        host = car(pull_fleet.inventory, name)
        assert host.service("rover-pull.timer").is_enabled
        active = [
            r for r in releases(host).values() if r.get("bundle") == content_hash(pull_fleet.bundles["a"])
        ]
        assert active, releases(host)
        assert _bytes_received(status) > 0
        # The release carries the Arduino's firmware publish.yml built for the car's board (an object of the
        # publication), with the controller's signature of its manifest (verified on the car before the
        # switch), and the restart onto it recorded what the board runs (flashed unless it ran it already).
        manifest = host.file(f"{RELEASES}/current/firmware/firmware.json")
        assert hashlib.sha256(manifest.content).hexdigest() in pull_fleet.payload()["objects"]
        firmware = json.loads(manifest.content_string)
        assert firmware["board"] == "uno"
        assert host.file(f"{RELEASES}/current/firmware/firmware.json.sig").exists
        fact = json.loads(host.file("/etc/ansible/facts.d/rover_firmware.fact").content_string)
        assert fact["ok"] is True, fact
        assert fact["release"] == current_release(host), fact
        assert fact["image_sha256"] == firmware["sha256"], fact
        # Prometheus sees the same (role rover_node_exporter, the agent's rover_pull.prom): the run's outcome
        # and the publication it applied.
        exported = _exported(pull_fleet, name)
        assert any(f'rover_pull_outcome{{outcome="{o}"}} 1' in exported for o in ("applied", "up-to-date")), (
            exported
        )
        assert f'rover_pull_applied_info{{publication="{publication}",' in exported, exported


def test_a_car_that_was_off_converges_after_it_boots(pull_fleet: PullFleet) -> None:
    power_off(FLEET, "car2")
    try:
        publication = pull_fleet.publish("b")
        status = _wait(pull_fleet, "car1", "publication b applied", _on(pull_fleet, "b", publication))
        # Only the new bundle's files moved: the runtime wheel and the collection were already on the car.
        payload = pull_fleet.payload()
        bundle_bytes = sum(payload["objects"][d] for d in set(payload["bundle"]["files"].values()))
        assert 0 < _bytes_received(status) <= bundle_bytes
    finally:
        power_on(FLEET, "car2")
    _wait(pull_fleet, "car2", "publication b applied after its boot", _on(pull_fleet, "b", publication))


def test_a_release_that_fails_its_gate_is_rolled_back_and_reported(pull_fleet: PullFleet) -> None:
    before = {name: current_bundle(car(pull_fleet.inventory, name)) for name in CARS}
    publication = pull_fleet.publish("gate-fails")

    def failed(host: Any, status: dict[str, Any]) -> bool:
        return status.get("publication") == publication and status.get("outcome") in {"failed", "gave-up"}

    for name in CARS:
        _wait(pull_fleet, name, "the bad publication reported", failed)
        host = car(pull_fleet.inventory, name)
        # One attempt, and never another: its release failed its gate here (the counter jumps to the most).
        state = _state(host)
        assert (state["publication"], state["outcome"], state["attempts"]) == (publication, "failed", 2), (
            state
        )
        assert (
            "failed its health gate on this car and it went back to its last good release" in state["message"]
        )
        status = _wait(
            pull_fleet, name, "the next period giving up", lambda h, s: s.get("outcome") == "gave-up"
        )
        assert f"publication {publication} failed here 2 times" in status["message"], status
        assert current_bundle(host) == before[name]
        bad = [
            r
            for r in releases(host).values()
            if r.get("bundle") == content_hash(pull_fleet.bundles["gate-fails"])
        ]
        assert bad, releases(host)
        assert all(r.get("state") == "bad" for r in bad), bad


def test_an_older_publication_put_back_on_the_server_is_refused(pull_fleet: PullFleet) -> None:
    """The replay of issue #27: the server serves publication a's metadata again (the cars have applied b and
    seen gate-fails since): every car refuses it and stays where it is."""
    before = {name: current_bundle(car(pull_fleet.inventory, name)) for name in CARS}
    now = pull_fleet.metadata()
    first = next(iter(pull_fleet.published))
    try:
        for path, data in pull_fleet.published[first].items():
            path.write_bytes(data)

        def refused(host: Any, status: dict[str, Any]) -> bool:
            return status.get("outcome") == "refused"

        for name in CARS:
            status = _wait(pull_fleet, name, "the old publication refused", refused, timeout=6 * PERIOD_S)
            assert "older than this car has already seen (an old publication put back)" in status["message"]
            assert current_bundle(car(pull_fleet.inventory, name)) == before[name]
            refused_line = 'rover_pull_outcome{outcome="refused"} 1'
            assert refused_line in _exported(pull_fleet, name, refused_line)
    finally:
        for path in (pull_fleet.publish_dir / "metadata").iterdir():
            if path not in now:
                path.unlink()
        for path, data in now.items():
            path.write_bytes(data)


def _hold_lock(host: Any, *, boot_id: str, pid: int | None = None) -> None:
    """A deploy lock on the car as another run would have left it, taken just now."""
    owner: dict[str, Any] = {
        "run": "other-run",
        "owner": "someone else",
        "since": time.time(),
        "boot_id": boot_id,
    }
    if pid is not None:
        owner.update(pid=pid, pid_start=int(host.check_output(f"cut -d' ' -f22 /proc/{pid}/stat")))
    lock = f"{RELEASES}/.deploy.lock"
    host.check_output(f"mkdir -p {lock} && echo {shlex.quote(json.dumps(owner))} > {lock}/owner.json")


def test_a_held_lock_is_a_retry_and_one_from_before_a_boot_is_taken_over(pull_fleet: PullFleet) -> None:
    """Another deploy holding car1's lock (its process alive) makes the pull wait without counting an
    attempt; once that process ends the lock is stale and the pull applies. A lock left by a run from before
    the car's last boot (a power cut during a pull) is stale at once: the car applies, never gives up."""
    host = car(pull_fleet.inventory, "car1")
    boot_id = host.check_output("cat /proc/sys/kernel/random/boot_id").strip()
    host.check_output("systemd-run --unit=rover-test-lock-holder sleep 900")
    try:
        pid = int(host.check_output("systemctl show -P MainPID rover-test-lock-holder"))
        _hold_lock(host, boot_id=boot_id, pid=pid)
        publication = pull_fleet.publish("a")
        status = _wait(
            pull_fleet, "car1", "the pull waiting for the lock",
            lambda h, s: s.get("publication") == publication and s.get("outcome") == "waiting",
        )  # fmt: skip
        assert status["message"].startswith("locked: deploy lock held by someone else (run other-run)"), (
            status
        )
        assert _state(host).get("publication") != publication  # no attempt counted
    finally:
        host.run("systemctl stop rover-test-lock-holder")
    status = _wait(
        pull_fleet, "car1", "publication a applied once the holder ended", _on(pull_fleet, "a", publication)
    )
    assert (_state(host)["publication"], _state(host)["attempts"]) == (publication, 1)

    _hold_lock(host, boot_id="00000000-0000-4000-8000-000000000000")  # taken before this boot
    publication = pull_fleet.publish("b")
    _wait(
        pull_fleet,
        "car1",
        "publication b applied over the old boot's lock",
        _on(pull_fleet, "b", publication),
    )
    state = _state(host)
    assert (state["publication"], state["outcome"], state["attempts"]) == (publication, "applied", 1), state


def test_a_server_the_car_cannot_reach_ages_into_stale(pull_fleet: PullFleet) -> None:
    """The server's metadata re-signed to expire in a minute (its daily refresh, shortened), fetched by car1;
    then the server goes down: car1 says `unreachable` and stays on its release; once the metadata it holds
    has expired it says `stale`, since that expiry, and Prometheus sees the same (rover_pull.prom)."""
    host = car(pull_fleet.inventory, "car1")
    before = current_bundle(host)
    Repository(
        pull_fleet.publish_dir, KeyStore(pull_fleet.keys), Lifetimes(timestamp=datetime.timedelta(seconds=75))
    ).refresh()
    refreshed = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    timestamp = json.loads((pull_fleet.publish_dir / "metadata" / "timestamp.json").read_text())
    expires = str(timestamp["signed"]["expires"])
    try:
        _wait(
            pull_fleet, "car1", "the short-lived timestamp fetched",
            lambda h, s: s.get("outcome") == "up-to-date" and str(s.get("last_fresh_at", "")) > refreshed,
            timeout=6 * PERIOD_S,
        )  # fmt: skip
        pull_fleet.server.down = True
        status = _wait(
            pull_fleet, "car1", "the server reported unreachable",
            lambda h, s: s.get("outcome") == "unreachable", timeout=3 * PERIOD_S,
        )  # fmt: skip
        assert "cannot download the publication from" in status["message"], status
        status = _wait(
            pull_fleet, "car1", "unreachable aged into stale", lambda h, s: s.get("outcome") == "stale",
            timeout=75 + 3 * PERIOD_S,
        )  # fmt: skip
        assert status["stale_since"] == expires, status
        assert f"cannot reach {pull_fleet.server_url}" in status["message"], status
        assert current_bundle(host) == before
        stale = 'rover_pull_outcome{outcome="stale"} 1'
        exported = _exported(pull_fleet, "car1", stale)
        assert stale in exported, exported
        since = datetime.datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        # node_exporter prints the value its own way (1.796587257e+09): compare the number.
        value = re.search(r"^rover_pull_stale_since_timestamp_seconds (\S+)$", exported, re.MULTILINE)
        assert value, exported
        assert float(value.group(1)) == since.timestamp(), exported
    finally:
        pull_fleet.server.down = False
        Repository(pull_fleet.publish_dir, KeyStore(pull_fleet.keys)).refresh()
