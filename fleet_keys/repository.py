"""The fleet's update repository in The Update Framework's format (python-tuf), as plain files to serve.

    <dir>/metadata/<n>.root.json        every root version (a car walks from the root it holds to the newest)
    <dir>/metadata/root.json            the newest root (what provisioning pins on a new car)
    <dir>/metadata/<n>.targets.json     the releases, signed by the targets key
    <dir>/metadata/<n>.snapshot.json    the targets version in force, signed by the snapshot key
    <dir>/metadata/timestamp.json       the snapshot version in force, by the timestamp key, short-lived
    <dir>/targets/<sha256>.<name>       each target's bytes, named by their hash (consistent snapshots)

Every file is written atomically, targets and the metadata they name before the metadata that names them,
timestamp.json last: a car reading at any moment sees one consistent repository. A car (tuf.ngclient) refuses
metadata older than what it has seen (a replayed publication), metadata past its expiry (a frozen server:
`stale`), metadata signed by a key the newest root does not list (a revoked key), and any file longer than
the metadata says (so nothing unbounded is ever read).

Lifetimes (Lifetimes): root 365 d, targets 90 d, snapshot 30 d, timestamp 2 d; `refresh` (a daily timer
where the repository is served) re-signs the timestamp, and the snapshot and targets when they would expire
within a week.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from fleet_keys.keys import ONLINE_ROLES, ROLES, KeyStore, KeyStoreError
from rover_runtime.metrics import write_bytes_atomic

SOON = datetime.timedelta(days=7)


class RepositoryError(Exception):
    """The repository cannot do what was asked: one sentence saying why and what to do."""


@dataclass(frozen=True)
class Lifetimes:
    root: datetime.timedelta = datetime.timedelta(days=365)
    targets: datetime.timedelta = datetime.timedelta(days=90)
    snapshot: datetime.timedelta = datetime.timedelta(days=30)
    timestamp: datetime.timedelta = datetime.timedelta(days=2)

    def of(self, role: str) -> datetime.timedelta:
        lifetime: datetime.timedelta = getattr(self, role)
        return lifetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass
class Repository:
    directory: Path
    keys: KeyStore
    lifetimes: Lifetimes = Lifetimes()

    @property
    def metadata_dir(self) -> Path:
        return self.directory / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.directory / "targets"

    # --- reading ------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.metadata_dir / "root.json").is_file()

    def _latest(self, role: str) -> tuple[Metadata[Any], bytes]:
        if role == "timestamp":
            path = self.metadata_dir / "timestamp.json"
        else:
            versions = [int(p.name.split(".", 1)[0]) for p in self.metadata_dir.glob(f"*.{role}.json")]
            if not versions:
                raise RepositoryError(
                    f"no {role} metadata in {self.metadata_dir}: run `python -m fleet_keys init`"
                )
            path = self.metadata_dir / f"{max(versions)}.{role}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RepositoryError(f"{path} is missing: run `python -m fleet_keys init`") from None
        return Metadata.from_bytes(data), data

    def root(self) -> Root:
        md, _ = self._latest("root")
        assert isinstance(md.signed, Root)
        return md.signed

    def targets(self) -> Targets:
        md, _ = self._latest("targets")
        assert isinstance(md.signed, Targets)
        return md.signed

    def role_keys(self, role: str) -> list[SSlibKey]:
        root = self.root()
        return [root.keys[keyid] for keyid in root.roles[role].keyids]  # type: ignore[misc]

    # --- writing ------------------------------------------------------------------------------------------

    def _write(self, path: Path, data: bytes) -> None:
        write_bytes_atomic(path, data, durable=True)

    def _sign(self, md: Metadata[Any], role: str, keys: list[SSlibKey], passphrase: bytes | None) -> bytes:
        for index, key in enumerate(keys):
            try:
                md.sign(self.keys.signer(key, passphrase if role == "root" else None), append=index > 0)
            except KeyStoreError as exc:
                raise RepositoryError(str(exc)) from None
        return bytes(md.to_bytes())

    def _write_role(self, signed: Targets | Snapshot, role: str) -> bytes:
        signed.expires = _now() + self.lifetimes.of(role)
        data = self._sign(Metadata(signed), role, self.role_keys(role), None)
        self._write(self.metadata_dir / f"{signed.version}.{role}.json", data)
        return data

    def _write_root(self, root: Root, signing_keys: list[SSlibKey], passphrase: bytes) -> None:
        root.expires = _now() + self.lifetimes.root
        data = self._sign(Metadata(root), "root", signing_keys, passphrase)
        self._write(self.metadata_dir / f"{root.version}.root.json", data)
        self._write(self.metadata_dir / "root.json", data)

    def _snapshot_and_timestamp(self, targets_data: bytes, targets_version: int) -> tuple[int, int]:
        """A new snapshot naming this targets version, then a timestamp naming it: their versions."""
        try:
            snapshot_md, _ = self._latest("snapshot")
            assert isinstance(snapshot_md.signed, Snapshot)
            version = snapshot_md.signed.version + 1
        except RepositoryError:
            version = 1
        snapshot = Snapshot(
            version=version,
            meta={"targets.json": MetaFile.from_data(targets_version, targets_data, ["sha256"])},
        )
        snapshot_data = self._write_role(snapshot, "snapshot")
        return version, self._timestamp(MetaFile.from_data(version, snapshot_data, ["sha256"]))

    def _timestamp_of_current_snapshot(self) -> int:
        """A new timestamp naming the snapshot in force (the only re-signing a fresh snapshot needs)."""
        snapshot_md, snapshot_data = self._latest("snapshot")
        return self._timestamp(MetaFile.from_data(snapshot_md.signed.version, snapshot_data, ["sha256"]))

    def _timestamp(self, snapshot_meta: MetaFile) -> int:
        try:
            current, _ = self._latest("timestamp")
            version = int(current.signed.version) + 1
        except RepositoryError:
            version = 1
        timestamp = Timestamp(
            version=version, expires=_now() + self.lifetimes.timestamp, snapshot_meta=snapshot_meta
        )
        data = self._sign(Metadata(timestamp), "timestamp", self.role_keys("timestamp"), None)
        self._write(self.metadata_dir / "timestamp.json", data)
        return version

    # --- what an operator does ------------------------------------------------------------------------------

    def init(self, root_passphrase: bytes) -> Root:
        """Keys for the four roles and the first version of each role's metadata."""
        if self.exists():
            raise RepositoryError(f"{self.directory} already holds a repository: rotate keys instead of init")
        root = Root(consistent_snapshot=True)
        for role in ROLES:
            root.add_key(self.keys.create(role, root_passphrase if role == "root" else None), role)
        self._write_root(root, [root.keys[k] for k in root.roles["root"].keyids], root_passphrase)  # type: ignore[misc]
        targets_data = self._write_role(Targets(version=1), "targets")
        self._snapshot_and_timestamp(targets_data, 1)
        return root

    def publish(self, name: str, data: bytes, custom: dict[str, Any]) -> int:
        """A new targets version naming `name` (its length, sha256 and `custom`); returns that version."""
        if not name or "/" in name or name.startswith("."):
            raise RepositoryError(f"target name {name!r}: one plain file name")
        targets = self.targets()
        target = TargetFile.from_data(name, data, ["sha256"])
        target.unrecognized_fields["custom"] = custom
        self._write(self.targets_dir / f"{target.hashes['sha256']}.{name}", data)
        targets.targets[name] = target
        targets.version += 1
        targets_data = self._write_role(targets, "targets")
        self._snapshot_and_timestamp(targets_data, targets.version)
        return targets.version

    def refresh(self) -> dict[str, int]:
        """Re-sign the timestamp (and the snapshot and targets when they expire within a week)."""
        signed: dict[str, int] = {}
        targets_md, targets_data = self._latest("targets")
        snapshot_md, _ = self._latest("snapshot")
        deadline = _now() + SOON
        assert isinstance(targets_md.signed, Targets)
        assert isinstance(snapshot_md.signed, Snapshot)
        if targets_md.signed.expires <= deadline:
            targets = targets_md.signed
            targets.version += 1
            targets_data = self._write_role(targets, "targets")
            signed["targets"] = targets.version
        if "targets" in signed or snapshot_md.signed.expires <= deadline:
            signed["snapshot"], signed["timestamp"] = self._snapshot_and_timestamp(
                targets_data, targets_md.signed.version
            )
        else:
            signed["timestamp"] = self._timestamp_of_current_snapshot()
        return signed

    def rotate(self, role: str, root_passphrase: bytes) -> SSlibKey:
        """A new key for `role` replaces its keys in a new root version (signed by the current root keys and,
        for root, by the new one too); the role's metadata is re-signed with it. The old keys' files go."""
        if role not in ROLES:
            raise RepositoryError(f"{role!r} is not a role: one of {', '.join(ROLES)}")
        root = self.root()
        old = self.role_keys(role)
        old_root_keys = self.role_keys("root")
        new = self.keys.create(role, root_passphrase if role == "root" else None)
        for key in old:
            root.revoke_key(key.keyid, role)
        root.add_key(new, role)
        root.version += 1
        signers = old_root_keys + ([new] if role == "root" else [])
        self._write_root(root, signers, root_passphrase)
        self._resign(role)
        for key in old:
            self.keys.remove(key)
        return new

    def add_key(self, role: str, root_passphrase: bytes) -> SSlibKey:
        """One more key for `role` in a new root version: a spare to switch to, or one for a second operator.
        Either key's signatures count (threshold 1)."""
        if role not in ROLES:
            raise RepositoryError(f"{role!r} is not a role: one of {', '.join(ROLES)}")
        root = self.root()
        signers = self.role_keys("root")
        new = self.keys.create(role, root_passphrase if role == "root" else None)
        root.add_key(new, role)
        root.version += 1
        self._write_root(root, signers + ([new] if role == "root" else []), root_passphrase)
        return new

    def revoke(self, keyid_prefix: str, root_passphrase: bytes) -> tuple[str, SSlibKey]:
        """Remove one key from the root (a lost or stolen key): every car refuses its signatures once it has
        the new root. A role's last key cannot be revoked: rotate it instead."""
        root = self.root()
        found = [
            (role, keyid)
            for role, r in root.roles.items()
            for keyid in r.keyids
            if keyid.startswith(keyid_prefix)
        ]
        if len(found) != 1 or not keyid_prefix:
            raise RepositoryError(
                f"{keyid_prefix!r} names {len(found)} keys of the root: give a longer prefix of one key id "
                "(python -m fleet_keys status lists them)"
            )
        role, keyid = found[0]
        if len(root.roles[role].keyids) == 1:
            raise RepositoryError(
                f"key {keyid[:16]} is the only {role} key: `python -m fleet_keys rotate {role}` replaces it"
            )
        key = root.keys[keyid]
        signers = [k for k in self.role_keys("root") if k.keyid != keyid]
        root.revoke_key(keyid, role)
        root.version += 1
        self._write_root(root, signers, root_passphrase)
        self._resign(role)
        assert isinstance(key, SSlibKey)
        self.keys.remove(key)
        return role, key

    def _resign(self, role: str) -> None:
        """After a root change: a new version of `role`'s metadata signed by its keys now (and those after
        it in the chain: a new targets needs a new snapshot, which needs a new timestamp)."""
        if role not in ONLINE_ROLES:
            return
        targets_md, targets_data = self._latest("targets")
        assert isinstance(targets_md.signed, Targets)
        if role == "targets":
            targets = targets_md.signed
            targets.version += 1
            targets_data = self._write_role(targets, "targets")
        if role in {"targets", "snapshot"}:
            self._snapshot_and_timestamp(targets_data, targets_md.signed.version)
        else:
            self._timestamp_of_current_snapshot()
