"""fleet_keys: the update repository (python-tuf metadata) and its keys, against tuf.ngclient as a car uses
it, served over HTTP. Replays, expiry, rotation and revocation, oversized and hostile metadata."""

from __future__ import annotations

import datetime
import functools
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater

from fleet_keys.cli import main as cli
from fleet_keys.keys import KeyStore, KeyStoreError
from fleet_keys.repository import Lifetimes, Repository, RepositoryError

PASSPHRASE = b"correct horse battery staple"


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Repository, str]]:
    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(PASSPHRASE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(repo.directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield repo, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Car:
    """A car's TUF client: the root pinned at provisioning, its metadata kept between checks."""

    def __init__(self, directory: Path, url: str, root: bytes) -> None:
        self.directory, self.url = directory, url
        (directory / "metadata").mkdir(parents=True)
        (directory / "targets").mkdir()
        (directory / "metadata" / "root.json").write_bytes(root)

    def check(self) -> Updater:
        updater = Updater(
            metadata_dir=str(self.directory / "metadata"),
            metadata_base_url=f"{self.url}/metadata/",
            target_dir=str(self.directory / "targets"),
            target_base_url=f"{self.url}/targets/",
            bootstrap=None,
        )
        updater.refresh()
        return updater

    def publication(self) -> tuple[bytes, dict[str, Any]]:
        updater = self.check()
        info = updater.get_targetinfo("publication.json")
        assert info is not None
        path = updater.find_cached_target(info) or updater.download_target(info)
        return Path(path).read_bytes(), info.unrecognized_fields["custom"]


def _car(tmp_path: Path, repo: Repository, url: str) -> Car:
    return Car(tmp_path / "car", url, (repo.metadata_dir / "root.json").read_bytes())


def _serve_targets_signed_by(repo: Repository, signer: Any) -> None:
    """What a thief holding `signer` (a targets key) and the server's online keys can serve: a new targets
    version signed by that key, with a snapshot and timestamp naming it."""
    md = Metadata.from_bytes(repo._latest("targets")[1])
    assert isinstance(md.signed, Targets)
    md.signed.version += 1
    md.sign(signer)
    repo._write(repo.metadata_dir / f"{md.signed.version}.targets.json", md.to_bytes())
    repo._snapshot_and_timestamp(md.to_bytes(), md.signed.version)


def test_a_car_gets_each_new_publication(served: tuple[Repository, str], tmp_path: Path) -> None:
    repo, url = served
    car = _car(tmp_path, repo, url)
    assert car.check().get_targetinfo("publication.json") is None
    repo.publish("publication.json", b'{"release": "a"}', {"rover": {"version": 1}})
    assert car.publication() == (b'{"release": "a"}', {"rover": {"version": 1}})
    repo.publish("publication.json", b'{"release": "b"}', {"rover": {"version": 2}})
    assert car.publication()[0] == b'{"release": "b"}'


def test_an_older_publication_put_back_on_the_server_is_refused(
    served: tuple[Repository, str], tmp_path: Path
) -> None:
    repo, url = served
    car = _car(tmp_path, repo, url)
    repo.publish("publication.json", b"A", {})
    saved = tmp_path / "saved"
    shutil.copytree(repo.metadata_dir, saved)
    car.publication()
    repo.publish("publication.json", b"B", {})
    assert car.publication()[0] == b"B"
    shutil.rmtree(repo.metadata_dir)
    shutil.copytree(saved, repo.metadata_dir)  # the attacker serves A's signed metadata again
    with pytest.raises(exceptions.BadVersionNumberError):
        car.check()


def test_expired_metadata_is_refused_as_stale(tmp_path: Path, served: tuple[Repository, str]) -> None:
    repo, url = served
    car = _car(tmp_path, repo, url)
    car.check()
    frozen = Repository(repo.directory, repo.keys, Lifetimes(timestamp=datetime.timedelta(seconds=-1)))
    frozen.refresh()  # a timestamp that has already expired: what a frozen server serves after 2 days
    with pytest.raises(exceptions.ExpiredMetadataError):
        car.check()
    repo.refresh()
    car.check()


def test_a_rotated_key_is_refused_after_the_root_update(
    served: tuple[Repository, str], tmp_path: Path
) -> None:
    repo, url = served
    car = _car(tmp_path, repo, url)
    car.check()
    thief = tmp_path / "stolen"
    shutil.copytree(repo.keys.directory, thief)  # a copy of the old targets key, taken before the rotation
    old_targets_key = repo.role_keys("targets")[0]
    new = repo.rotate("targets", PASSPHRASE)
    assert new.keyid != old_targets_key.keyid
    assert repo.root().version == 2
    assert not list(
        repo.keys.directory.glob(f"*-{old_targets_key.keyid[:16]}.*")
    )  # the old key's files are gone
    repo.publish("publication.json", b"legit", {})
    assert car.publication()[0] == b"legit"  # the car walked to root v2 and trusts the new key
    # The thief signs new targets with the old key; the server's online snapshot/timestamp keys go along.
    _serve_targets_signed_by(repo, KeyStore(thief).signer(old_targets_key))
    with pytest.raises(exceptions.UnsignedMetadataError):
        car.check()


def test_rotating_the_root_key_keeps_cars_that_hold_the_old_root(
    served: tuple[Repository, str], tmp_path: Path
) -> None:
    repo, url = served
    car = _car(tmp_path, repo, url)
    repo.rotate("root", PASSPHRASE)
    repo.rotate("timestamp", PASSPHRASE)
    repo.publish("publication.json", b"after", {})
    assert car.publication()[0] == b"after"
    assert json.loads((car.directory / "metadata" / "root.json").read_text())["signed"]["version"] == 3


def test_a_revoked_key_is_refused_by_the_car(served: tuple[Repository, str], tmp_path: Path) -> None:
    """A second targets key, then the first one revoked (it was stolen): the car, once it has the new root,
    refuses what the stolen key signs and accepts what the remaining key signs."""
    repo, url = served
    car = _car(tmp_path, repo, url)
    car.check()
    stolen_key = repo.role_keys("targets")[0]
    thief = tmp_path / "stolen"
    shutil.copytree(repo.keys.directory, thief)
    spare = repo.add_key("targets", PASSPHRASE)
    role, revoked = repo.revoke(stolen_key.keyid[:12], PASSPHRASE)
    assert (role, revoked.keyid) == ("targets", stolen_key.keyid)
    assert [k.keyid for k in repo.role_keys("targets")] == [spare.keyid]
    repo.publish("publication.json", b"signed by the spare", {})
    assert car.publication()[0] == b"signed by the spare"
    _serve_targets_signed_by(repo, KeyStore(thief).signer(stolen_key))
    with pytest.raises(exceptions.UnsignedMetadataError):
        car.check()


def test_the_last_key_of_a_role_cannot_be_revoked(served: tuple[Repository, str]) -> None:
    repo, _ = served
    keyid = repo.role_keys("targets")[0].keyid
    with pytest.raises(
        RepositoryError, match="is the only targets key: `python -m fleet_keys rotate targets`"
    ):
        repo.revoke(keyid[:12], PASSPHRASE)
    with pytest.raises(RepositoryError, match="names 0 keys"):
        repo.revoke("ffffffffffff", PASSPHRASE)


@pytest.mark.parametrize("body", ["huge", "nested"])
def test_oversized_or_hostile_metadata_is_refused(
    served: tuple[Repository, str], tmp_path: Path, body: str
) -> None:
    repo, url = served
    car = _car(tmp_path, repo, url)
    car.check()
    timestamp = repo.metadata_dir / "timestamp.json"
    if body == "huge":
        with timestamp.open("wb") as handle:
            handle.truncate(400 << 20)  # sparse: ngclient reads at most its 16 KiB timestamp limit
    else:
        timestamp.write_text("[" * 10_000)  # under the 16 KiB limit: the parser must refuse it
    with pytest.raises(exceptions.RepositoryError if body == "nested" else exceptions.DownloadError):
        car.check()


def test_keys_are_kept_private_and_the_root_key_needs_its_passphrase(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    with pytest.raises(KeyStoreError, match="a root key needs a passphrase"):
        keys.create("root")
    key = keys.create("root", PASSPHRASE)
    pem = next(keys.directory.glob("root-*.pem"))
    assert pem.stat().st_mode & 0o777 == 0o600
    assert keys.directory.stat().st_mode & 0o777 == 0o700
    assert b"ENCRYPTED PRIVATE KEY" in pem.read_bytes()
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        keys.signer(key, b"wrong")
    with pytest.raises(KeyStoreError, match="is encrypted: give its passphrase"):
        keys.signer(key)
    keys.directory.chmod(0o755)
    with pytest.raises(KeyStoreError, match="readable or writable by others"):
        keys.signer(key, PASSPHRASE)


def test_the_cli_inits_publishes_and_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("ROVER_ROOT_PASSPHRASE", PASSPHRASE.decode())
    base = ["--repo", str(tmp_path / "repo"), "--keys", str(tmp_path / "keys")]
    assert cli([*base, "init"]) == 0
    assert json.loads(capsys.readouterr().out)["roles"]["root"]["version"] == 1
    assert cli([*base, "init"]) == 2
    assert "already holds a repository" in capsys.readouterr().err
    (tmp_path / "p.json").write_text("{}")
    assert cli([*base, "publish", "publication.json", str(tmp_path / "p.json"), "--custom", '{"v": 1}']) == 0
    assert json.loads(capsys.readouterr().out) == {"targets_version": 2}
    assert cli([*base, "rotate", "snapshot"]) == 0
    assert json.loads(capsys.readouterr().out)["root_version"] == 2
    assert cli([*base, "publish", "publication.json", str(tmp_path / "missing")]) == 2
    assert "publish: [Errno 2]" in capsys.readouterr().err
