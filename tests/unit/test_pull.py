"""Pull mode's two ends without a car: the controller's publisher (roles/rover_release/files/publish.py,
writing into an update repository made by fleet_keys) and the car's agent
(roles/rover_pull/files/rover_pull.py, on tuf.ngclient) over real HTTP, with real TUF metadata and keys.
What the agent refuses (a replayed, expired, tampered, foreign, oversized or hostile repository) never
reaches its deploy step; the deploy on a car: tests/integration/test_pull_mode.py."""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fleet_keys.keys import KeyStore
from fleet_keys.repository import Lifetimes, Repository
from rover_runtime.testing import write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
PUBLISH = REPO / "roles" / "rover_release" / "files" / "publish.py"
PASSPHRASE = b"pull test root passphrase"


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


AGENT = REPO / "roles" / "rover_pull" / "files" / "rover_pull.py"
# On the car the agent imports release_state.py from its own directory (the role installs it there).
_load(REPO / "plugins" / "module_utils" / "release_state.py", "release_state")
agent: Any = _load(AGENT, "rover_pull_agent")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Controller:
    root: Path
    keys: Path
    url: str
    signing_key: Path
    bundle: Path
    wheel: Path
    collection: Path
    inventory: Path

    @property
    def repository(self) -> Repository:
        return Repository(self.root, KeyStore(self.keys))

    def publish(self, *extra: str) -> dict[str, Any]:
        done = self.run_publish(*extra)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def run_publish(self, *extra: str) -> subprocess.CompletedProcess[str]:
        sig = self.root.parent / "manifest.json.sig"
        signed = subprocess.run(
            ["ssh-keygen", "-Y", "sign", "-f", str(self.signing_key), "-n", "rover-bundle"],
            input=(self.bundle / "manifest.json").read_bytes(),
            capture_output=True,
            check=True,
        )
        sig.write_bytes(signed.stdout)
        return subprocess.run(
            [
                sys.executable,
                str(PUBLISH),
                "--root",
                str(self.root),
                "--bundle",
                str(self.bundle),
                "--bundle-signature",
                str(sig),
                "--wheel",
                str(self.wheel),
                "--runtime-key",
                "key-1",
                "--collection",
                str(self.collection),
                "--inventory",
                str(self.inventory),
                "--hosts",
                "car1,car2",
                "--keys",
                str(self.keys),
                "--car-keys",
                str(self.car_keys),
                *extra,
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    @property
    def car_keys(self) -> Path:
        return self.keys.parent / "cars"

    def payload(self) -> dict[str, Any]:
        """The publication the repository's newest targets metadata names."""
        target = self.repository.targets().targets["publication.json"]
        path = self.root / "targets" / f"{target.hashes['sha256']}.publication.json"
        return dict(json.loads(path.read_text()))


def _keypair(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    root = tmp_path / "publish"
    keys = tmp_path / "keys" / "tuf"
    Repository(root, KeyStore(keys)).init(PASSPHRASE)
    (keys.parent / "cars").mkdir(mode=0o700)
    for car in ("car1", "car2"):  # as role rover_pull makes them
        (keys.parent / "cars" / f"{car}.key").write_text(os.urandom(32).hex() + "\n")
    signing_key = _keypair(tmp_path / "keys" / "signing")
    bundle = write_tiny_bundle(tmp_path / "bundle")
    wheel = tmp_path / "rover_fleet-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("rover_runtime/__init__.py", "")
    collection = tmp_path / "rover-fleet-0.1.0.tar.gz"
    playbook = tmp_path / "deploy.yml"
    playbook.write_text("---\n")
    with tarfile.open(collection, "w:gz") as archive:
        archive.add(playbook, arcname="playbooks/deploy.yml")
    inventory = tmp_path / "inventory.json"
    inventory.write_text(
        json.dumps(
            {
                "_meta": {
                    "hostvars": {
                        "car1": {"ansible_host": "10.0.0.1", "rover_runtime_service_rate_hz": 30},
                        "car2": {"ansible_port": 22, "simfleet_serial_device": "/dev/ttyUSB0"},
                    }
                },
                "all": {"children": ["ungrouped", "rovers"]},
                "rovers": {"children": ["simulated"], "hosts": ["car1"]},
                "simulated": {"hosts": ["car2"]},
            }
        )
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Controller(
            root=root,
            keys=keys,
            url=f"http://127.0.0.1:{server.server_address[1]}",
            signing_key=signing_key,
            bundle=bundle,
            wheel=wheel,
            collection=collection,
            inventory=inventory,
        )
    finally:
        server.shutdown()
        server.server_close()


def _car(tmp_path: Path, controller: Controller, trusted_root: Path | None = None) -> Any:
    """A provisioned car: the repository's root metadata pinned and its pull key, as role rover_pull
    installs them."""
    car = tmp_path / "car"
    car.mkdir(exist_ok=True)
    shutil.copyfile(trusted_root or controller.root / "metadata" / "root.json", car / "root.json")
    shutil.copyfile(controller.car_keys / "car1.key", car / "pull.key")
    config = car / "pull.json"
    config.write_text(
        json.dumps(
            {
                "url": controller.url,
                "car": "car1",
                "state_dir": str(car / "state"),
                "venv": str(car / "no-venv"),
                "trusted_root": str(car / "root.json"),
                "car_key": str(car / "pull.key"),
                "metrics_path": str(car / "metrics.json"),
                "timeout_s": 5,
                "textfile": str(car / "textfile" / "rover_pull.prom"),
            }
        )
    )
    return agent.PullConfig.load(config)


def _status(config: Any) -> dict[str, Any]:
    return dict(json.loads((config.state_dir / "status.json").read_text()))


def test_a_publication_is_signed_content_addressed_and_names_each_cars_entry(
    controller: Controller, tmp_path: Path
) -> None:
    result = controller.publish()
    payload = controller.payload()
    assert payload["id"] == result["id"]
    target = controller.repository.targets().targets["publication.json"]
    assert target.custom == {
        "rover": {
            "publication": result["id"],
            "hosts": ["car1", "car2"],
            "published_at": payload["published_at"],
        }
    }
    for digest, size in payload["objects"].items():
        data = (controller.root / "objects" / digest).read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == digest
    # Each car's entry is readable by that car alone (its pull key): groups with their parents, no connection
    # variable (the car runs the playbook locally).
    config = _car(tmp_path, controller)
    sealed = {name: (controller.root / "objects" / d).read_bytes() for name, d in payload["cars"].items()}
    assert b"ttyUSB0" not in sealed["car2"]
    assert b"rate_hz" not in sealed["car1"]
    config.car = "car2"
    config.car_key = controller.car_keys / "car2.key"
    car2 = agent.open_car_entry(config, sealed["car2"])
    assert car2 == {"groups": ["rovers", "simulated"], "vars": {"simfleet_serial_device": "/dev/ttyUSB0"}}
    config.car_key = controller.car_keys / "car1.key"
    with pytest.raises(agent.PullError, match="does not open with"):  # car2's entry, car1's key
        agent.open_car_entry(config, sealed["car2"])
    with pytest.raises(agent.PullError, match="does not open with"):  # car1's entry passed off as car2's
        agent.open_car_entry(config, sealed["car1"])
    config.car = "car1"
    car1 = agent.open_car_entry(config, sealed["car1"])
    assert car1 == {"groups": ["rovers"], "vars": {"rover_runtime_service_rate_hz": 30}}
    assert set(payload["bundle"]["files"]) >= {"manifest.json", "manifest.json.sig"}
    # Publishing the same release again writes no byte and names the same publication.
    again = controller.publish()
    assert again["id"] == result["id"]
    assert again["bytes_written"] == 0
    assert result["bytes_written"] == result["bytes"] > 0
    # A collection rebuilt from the same files (new time stamps, as every `ansible-galaxy collection build`)
    # is the same object: the cars download nothing new.
    playbook = tmp_path / "deploy.yml"
    os.utime(playbook, (1e9, 1e9))
    time.sleep(1.1)
    with tarfile.open(controller.collection, "w:gz") as archive:
        archive.add(playbook, arcname="playbooks/deploy.yml")
    rebuilt = controller.publish()
    assert (rebuilt["id"], rebuilt["bytes_written"]) == (result["id"], 0)


def test_a_car_without_a_pull_key_is_not_published_to(controller: Controller, tmp_path: Path) -> None:
    (controller.car_keys / "car2.key").unlink()
    done = subprocess.run(
        [sys.executable, str(PUBLISH), "--root", str(controller.root), "--bundle", str(controller.bundle),
         "--bundle-signature", str(controller.bundle / "manifest.json"), "--wheel", str(controller.wheel),
         "--runtime-key", "k", "--collection", str(controller.collection), "--inventory",
         str(controller.inventory), "--hosts", "car1,car2", "--keys", str(controller.keys),
         "--car-keys", str(controller.car_keys)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: car2 has no pull key ({controller.car_keys / 'car2.key'})")
    assert not (controller.root / "objects").exists()  # refused before anything was written


def test_the_car_downloads_only_what_it_lacks_and_unpacks_the_release(
    controller: Controller, tmp_path: Path
) -> None:
    controller.publish()
    config = _car(tmp_path, controller)
    channel = agent.open_publication(agent.fetch_publication(config))
    objects: dict[str, Path] = {}
    received = 0
    for digest, size in channel["objects"].items():
        objects[digest], got = agent.ensure_object(config, digest, size)
        received += got
    assert received == sum(channel["objects"].values())
    assert sum(agent.ensure_object(config, d, s)[1] for d, s in channel["objects"].items()) == 0
    work = agent.prepare_work(config, channel, objects)
    assert (work / "bundle" / "manifest.json").read_bytes() == (
        controller.bundle / "manifest.json"
    ).read_bytes()
    assert (work / "lib" / "rover_runtime" / "__init__.py").is_file()
    assert (work / "collections/ansible_collections/rover/fleet/playbooks/deploy.yml").is_file()
    inventory = json.loads((work / "inventory.json").read_text())
    car1 = inventory["all"]["children"]["rovers"]["hosts"]["car1"]
    assert car1["ansible_connection"] == "local"
    assert car1["rover_runtime_service_rate_hz"] == 30
    extra = json.loads((work / "vars.json").read_text())
    assert extra["rover_release_sign"] is False
    assert extra["rover_runtime_service_wheel_key"] == "key-1"


def _firmware(controller: Controller, tmp_path: Path) -> Path:
    """A firmware directory as fleet_firmware builds it (its content is opaque to the publisher) and the
    firmware-map naming it for car1 with the controller's signature of its manifest."""
    directory = tmp_path / "firmware-uno"
    directory.mkdir()
    (directory / "rover_car.hex").write_text(":00000001FF\n")
    (directory / "firmware.json").write_text(json.dumps({"board": "uno", "version": "2.0.0"}))
    signature = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(controller.signing_key), "-n", "rover-bundle"],
        input=(directory / "firmware.json").read_bytes(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    firmware_map = tmp_path / "firmware-map.json"
    firmware_map.write_text(json.dumps({"car1": {"dir": str(directory), "signature": signature}}))
    return firmware_map


def _unpacked(controller: Controller, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """car1's work directory for the newest publication and the extra variables of its deploy."""
    config = _car(tmp_path, controller)
    channel = agent.open_publication(agent.fetch_publication(config))
    objects = {
        digest: agent.ensure_object(config, digest, size)[0] for digest, size in channel["objects"].items()
    }
    work = agent.prepare_work(config, channel, objects)
    return work, json.loads((work / "vars.json").read_text())


def test_a_cars_firmware_travels_signed_in_its_entry_and_the_deploy_flashes_it(
    controller: Controller, tmp_path: Path
) -> None:
    """The board's hex, its manifest and the controller's signature of it reach car1 byte for byte, and
    the car's deploy manages the firmware from that directory, checked against the published runtime. A
    publication without firmware for the car (its rover_firmware_manage false) leaves the board alone."""
    firmware_map = _firmware(controller, tmp_path)
    controller.publish("--firmware-map", str(firmware_map))
    work, extra = _unpacked(controller, tmp_path)
    spec = json.loads(firmware_map.read_text())["car1"]
    for name in ("rover_car.hex", "firmware.json"):
        assert (work / "firmware" / name).read_bytes() == (Path(spec["dir"]) / name).read_bytes()
    assert (work / "firmware" / "firmware.json.sig").read_text() == spec["signature"].strip() + "\n"
    assert extra["rover_firmware_manage"] is True
    assert extra["rover_firmware_dir"] == str(work / "firmware")
    assert extra["rover_firmware_controller_source"] == str(work / "lib")

    controller.publish()
    work, extra = _unpacked(controller, tmp_path)
    assert extra["rover_firmware_manage"] is False
    assert "rover_firmware_dir" not in extra
    assert not (work / "firmware").exists()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            lambda spec: {"car9": spec["car1"]},
            "--firmware-map names car9, which is not among the cars published",
        ),
        (
            lambda spec: {"car1": {**spec["car1"], "dir": "/nonexistent"}},
            "lacks rover_car.hex, firmware.json",
        ),
        (lambda spec: {"car1": {**spec["car1"], "signature": "trust me"}}, "is not an ssh signature"),
        (lambda spec: {"car1": {"dir": spec["car1"]["dir"]}}, "car1: its firmware needs a directory"),
        (lambda spec: ["car1"], "must map each car to its firmware"),
    ],
)
def test_a_bad_firmware_map_is_refused_and_nothing_is_published(
    controller: Controller, tmp_path: Path, change: Any, error: str
) -> None:
    firmware_map = _firmware(controller, tmp_path)
    firmware_map.write_text(json.dumps(change(json.loads(firmware_map.read_text()))))
    done = controller.run_publish("--firmware-map", str(firmware_map))
    assert done.returncode == 1
    assert done.stderr.startswith("error: "), done.stderr
    assert error in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (controller.root / "publications").exists()
    assert not (controller.root / "objects").exists()
    assert "publication.json" not in controller.repository.targets().targets


@pytest.mark.parametrize(
    "entry",
    [
        ["rover_car.hex"],
        {"rover_car.hex": "0" * 64, "firmware.json": "1" * 64},
        {"rover_car.hex": "0" * 64, "firmware.json": "1" * 64, "firmware.json.sig": "2" * 64},
        {"rover_car.hex": ["x"], "firmware.json": "1" * 64, "firmware.json.sig": "2" * 64},
    ],
)
def test_a_firmware_entry_the_car_cannot_use_is_refused(tmp_path: Path, entry: Any) -> None:
    """An entry naming other files, or objects the publication does not hold, is refused before the deploy."""
    with pytest.raises(agent.PullError, match="firmware"):
        agent.unpack_firmware(entry, {"f" * 64: tmp_path / "x"}, tmp_path / "firmware")
    assert not (tmp_path / "firmware").exists()


def test_a_publication_changed_after_signing_is_refused(controller: Controller, tmp_path: Path) -> None:
    controller.publish()
    target = controller.repository.targets().targets["publication.json"]
    path = controller.root / "targets" / f"{target.hashes['sha256']}.publication.json"
    path.write_text(path.read_text().replace('"car1"', '"car9"', 1))  # the same length, another content
    config = _car(tmp_path, controller)
    assert agent.run(config) == 1
    status = _status(config)
    assert status["outcome"] == "refused"
    assert "is not the one its signed metadata names (changed after signing)" in status["message"]
    assert not (config.state_dir / "objects").exists()  # nothing was downloaded


def test_a_repository_of_another_controller_is_refused(controller: Controller, tmp_path: Path) -> None:
    controller.publish()
    other = Repository(tmp_path / "other", KeyStore(tmp_path / "other-keys"))
    other.init(PASSPHRASE)
    config = _car(tmp_path, controller, trusted_root=other.metadata_dir / "root.json")
    assert agent.run(config) == 1
    status = _status(config)
    assert status["outcome"] == "refused"
    assert "not signed by the keys this car trusts" in status["message"]


def _snapshot_of_server(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (root / "metadata").iterdir()}


def test_an_older_publication_put_back_on_the_server_is_refused(
    controller: Controller, tmp_path: Path
) -> None:
    """The replay of issue #27: publish A, the car sees A; publish B, the car sees B; put A's metadata back
    on the server: refused, the car stays on B (and never deploys A again)."""
    config = _car(tmp_path, controller)
    first = controller.publish()
    assert agent.open_publication(agent.fetch_publication(config))["id"] == first["id"]
    old = _snapshot_of_server(controller.root)
    controller.bundle = write_tiny_bundle(tmp_path / "bundle-2", chunk_size=7)
    second = controller.publish()
    assert agent.open_publication(agent.fetch_publication(config))["id"] == second["id"]
    for path, data in old.items():
        path.write_bytes(data)
    assert agent.run(config) == 1
    status = _status(config)
    assert status["outcome"] == "refused"
    assert "older than this car has already seen (an old publication put back)" in status["message"]
    assert "publication" not in status


def test_a_server_whose_metadata_expired_is_stale_and_says_since_when(
    controller: Controller, tmp_path: Path
) -> None:
    """A server frozen on one state (or replaying it): once its timestamp expires the car reports `stale`
    (exit 1, the unit failed) with when it expired and when the car last had fresh metadata; it deploys
    nothing. A car that cannot reach the server past that expiry is stale too, not `unreachable`."""
    controller.publish()
    short = Repository(
        controller.root, KeyStore(controller.keys), Lifetimes(timestamp=datetime.timedelta(seconds=2))
    )
    short.refresh()
    config = _car(tmp_path, controller)
    agent.fetch_publication(config)  # fresh: the car holds that timestamp
    (config.state_dir / "status.json").write_text(json.dumps({"last_fresh_at": "2026-12-05T10:00:00Z"}))
    time.sleep(3)
    assert agent.run(config) == 1
    status = _status(config)
    assert status["outcome"] == "stale", status
    expires = json.loads((controller.root / "metadata" / "timestamp.json").read_text())["signed"]["expires"]
    assert status["stale_since"] == expires
    assert status["last_fresh_at"] == "2026-12-05T10:00:00Z"
    assert "timestamp.json is expired" in status["message"]
    assert not (config.state_dir / "objects").exists()
    # What Prometheus sees (node_exporter's textfile collector): stale, since when, and valid exposition text.
    exposition = config.textfile.read_text()
    assert 'rover_pull_outcome{outcome="stale"} 1' in exposition
    assert 'rover_pull_outcome{outcome="unreachable"} 0' in exposition
    assert f"rover_pull_stale_since_timestamp_seconds {agent.iso_to_unix(expires):.0f}" in exposition
    assert "rover_pull_last_fresh_timestamp_seconds 1796464800" in exposition  # 2026-12-05T10:00:00Z
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, (check.stdout, check.stderr, exposition)
    config.url = "http://127.0.0.1:9"  # nothing listens: still stale, since the same time
    assert agent.run(config) == 1
    assert (_status(config)["outcome"], _status(config)["stale_since"]) == ("stale", expires)
    config.url = controller.url
    controller.repository.refresh()  # the server's timer runs again
    assert agent.open_publication(agent.fetch_publication(config))


def test_a_rotated_key_is_followed_by_the_car(controller: Controller, tmp_path: Path) -> None:
    """The targets key replaced (root v2, signed by the root key): a car provisioned with root v1 follows."""
    config = _car(tmp_path, controller)
    controller.publish()
    controller.repository.rotate("targets", PASSPHRASE)
    controller.bundle = write_tiny_bundle(tmp_path / "bundle-2", chunk_size=7)
    second = controller.publish()
    assert agent.open_publication(agent.fetch_publication(config))["id"] == second["id"]
    assert json.loads((config.state_dir / "tuf" / "root.json").read_text())["signed"]["version"] == 2


def test_an_object_changed_on_the_server_is_refused_and_never_kept(
    controller: Controller, tmp_path: Path
) -> None:
    controller.publish()
    payload = controller.payload()
    model = next(d for name, d in payload["bundle"]["files"].items() if name != "manifest.json")
    target = controller.root / "objects" / model
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    config = _car(tmp_path, controller)
    assert agent.run(config) == 1
    status = json.loads((config.state_dir / "status.json").read_text())
    assert status["outcome"] == "refused"
    assert f"object {model[:12]} does not match the publication" in status["message"]
    assert not (config.state_dir / "objects" / model).exists()
    assert not [p for p in (config.state_dir / "objects").iterdir() if p.name.startswith(".")]


def test_an_unreachable_server_is_a_quiet_retry(controller: Controller, tmp_path: Path) -> None:
    config = _car(tmp_path, controller)
    config.url = "http://127.0.0.1:9"  # discard port: nothing listens
    assert agent.run(config) == 0
    assert json.loads((config.state_dir / "status.json").read_text())["outcome"] == "unreachable"


def test_a_driving_car_waits_and_a_car_not_published_does_nothing(
    controller: Controller, tmp_path: Path
) -> None:
    controller.publish()
    config = _car(tmp_path, controller)
    config.metrics_path.write_text(json.dumps({"driving": True}))
    assert agent.run(config) == 0
    assert json.loads((config.state_dir / "status.json").read_text())["outcome"] == "waiting"
    assert not (config.state_dir / "objects").exists()
    config.car = "car7"
    assert agent.run(config) == 0
    assert json.loads((config.state_dir / "status.json").read_text())["outcome"] == "not-published"


def test_a_publication_that_failed_here_is_tried_max_attempts_times(
    controller: Controller, tmp_path: Path
) -> None:
    result = controller.publish()
    config = _car(tmp_path, controller)
    agent.write_json_atomic(
        config.state_dir / "state.json",
        {"publication": result["id"], "outcome": "failed", "attempts": 2, "message": "FAILED: gate"},
    )
    assert agent.run(config) == 0
    status = json.loads((config.state_dir / "status.json").read_text())
    assert status["outcome"] == "gave-up"
    assert "waiting for a new publication" in status["message"]


def test_old_publications_objects_are_pruned_on_the_server(controller: Controller, tmp_path: Path) -> None:
    first = controller.publish("--keep", "1")
    other = write_tiny_bundle(tmp_path / "bundle-2", chunk_size=7)
    controller.bundle = other
    second = controller.publish("--keep", "1")
    assert second["id"] != first["id"]
    assert second["objects_removed"] > 0
    assert not (controller.root / "publications" / f"{first['id']}.json").exists()
    payload = controller.payload()
    assert {p.name for p in (controller.root / "objects").iterdir()} == set(payload["objects"])


def test_a_release_whose_gate_failed_during_the_run_is_found(tmp_path: Path) -> None:
    """After a failed deploy the agent gives up at once when the run's release failed its health gate (no
    second drive on a known-bad release); a release marked bad before the run does not count."""
    releases = tmp_path / "releases"
    for name, state, gated_at in (("aaaa", "bad", 100.0), ("bbbb", "good", 300.0), ("cccc", "bad", 250.0)):
        (releases / name).mkdir(parents=True)
        (releases / name / "status.json").write_text(json.dumps({"state": state, "gated_at": gated_at}))
    (releases / ".incoming-dddd-run").mkdir()
    assert agent.releases_failed_since(tmp_path, 200.0) == ["cccc"]
    assert agent.releases_failed_since(tmp_path, 50.0) == ["aaaa", "cccc"]
    assert agent.releases_failed_since(tmp_path / "none", 0.0) == []


def test_a_huge_timestamp_is_refused_unread_within_bounded_memory(
    controller: Controller, tmp_path: Path
) -> None:
    """A 400 MB timestamp.json (a sparse file: nothing on disk) is refused once it passes the 16 KiB a
    timestamp may have; the agent, a process of its own as on the car, stays far below the 64 MB the car
    allows it."""
    controller.publish()
    config = _car(tmp_path, controller)
    with (controller.root / "metadata" / "timestamp.json").open("wb") as handle:
        handle.truncate(400 << 20)
    wrapper = (
        "import resource, subprocess, sys\n"
        "agent = [sys.executable, sys.argv[1], '--config', sys.argv[2]]\n"
        "done = subprocess.run(agent, stdout=subprocess.DEVNULL, check=False)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    installed = tmp_path / "lib"  # as the role installs it: the agent with release_state.py beside it
    installed.mkdir()
    for source in (AGENT, REPO / "plugins" / "module_utils" / "release_state.py"):
        shutil.copy2(source, installed / source.name)
    out = subprocess.run(
        [sys.executable, "-c", wrapper, str(installed / AGENT.name), str(tmp_path / "car" / "pull.json")],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    code, peak_kib = (int(v) for v in out.split())
    assert code == 1
    status = _status(config)
    assert status["outcome"] == "refused"
    assert "the server sent more than the signed metadata allows" in status["message"]
    assert peak_kib < 64 * 1024, f"the agent peaked at {peak_kib} KiB"


@pytest.mark.parametrize("nested", ["[" * 8_000, '{"a":' * 3_000])
def test_a_deeply_nested_timestamp_is_refused(controller: Controller, tmp_path: Path, nested: str) -> None:
    controller.publish()
    config = _car(tmp_path, controller)
    (controller.root / "metadata" / "timestamp.json").write_text(nested)
    assert agent.run(config) == 1
    status = _status(config)
    assert status["outcome"] == "refused", status
    assert status["message"].startswith("the update metadata is not valid"), status


def test_a_cached_object_changed_on_the_car_is_downloaded_again(
    controller: Controller, tmp_path: Path
) -> None:
    """Cached objects are checked by their sha256 before use, not trusted by their size."""
    controller.publish()
    payload = controller.payload()
    digest, size = max(payload["objects"].items(), key=lambda item: item[1])
    config = _car(tmp_path, controller)
    path, received = agent.ensure_object(config, digest, size)
    assert received == size
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # the same size, another content (a flipped bit on the card)
    path.write_bytes(bytes(data))
    path, received = agent.ensure_object(config, digest, size)
    assert received == size  # downloaded again
    assert agent.sha256_file(path) == digest
    assert agent.ensure_object(config, digest, size)[1] == 0  # and now used from the cache


def test_the_deploys_result_is_read_from_its_results_file(tmp_path: Path) -> None:
    results = {"cars": {"car1": {"status": "locked", "message": "deploy lock held by someone"}}}
    (tmp_path / agent.RESULTS).write_text(json.dumps(results))
    assert agent.deploy_result(tmp_path, "car1", "ok: [car1] car1: ok: looks fine") == agent.Applied(
        "locked", "deploy lock held by someone"
    )
    # No result for this car, or none at all (the deploy crashed): failed, with the end of its output.
    for text in (json.dumps({"cars": {}}), "{torn", None):
        if text is None:
            (tmp_path / agent.RESULTS).unlink()
        else:
            (tmp_path / agent.RESULTS).write_text(text)
        applied = agent.deploy_result(tmp_path, "car1", "line 1\nERROR! the playbook crashed\n")
        assert applied == agent.Applied(
            "failed", "the deploy wrote no result: line 1 / ERROR! the playbook crashed"
        )
