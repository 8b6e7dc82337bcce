#!/usr/bin/env python3
"""Publish a release for the cars in pull mode to converge to (playbooks/publish.yml, on the controller).

The publication directory (served by any HTTP server; docs/pull.md) holds:

    objects/<sha256>        every file of the publication, content-addressed: the bundle's files (with the
                            controller's manifest signature), the rover_runtime wheel, the rover.fleet
                            collection and one entry per car ({"groups": [...], "vars": {...}}: its inventory
                            entry without the connection variables), encrypted for that car alone (AES-256-GCM
                            with the car's pull key, which provisioning made and gave the car: the variables
                            may hold secrets, and the server serves anyone); a car whose releases carry
                            the Arduino's firmware has its board's files named in its entry (`firmware`:
                            the hex, firmware.json and the controller's signature of it)
    metadata/, targets/     the update repository (The Update Framework, python-tuf; fleet_keys): the
                            publication JSON is its one target, `publication.json`, named with its length
                            and sha256 in targets metadata signed by the targets key, under a snapshot and a
                            short-lived timestamp (timestamp.json, written last)
    publications/<id>.json  the payloads published so far (the objects of the last `--keep` stay)

A car's agent (tuf.ngclient, from the root metadata provisioning pinned) refuses metadata older than what it
has seen, expired, or signed by a key the root does not list, then downloads publication.json (checked against
the signed length and hash) and fetches only the objects it lacks, each checked against the sha256 the
publication names. Every file is in place before the metadata that names it, timestamp.json last: a car reads
the old publication or the new one, never a mix.

    publish.py --root DIR --bundle DIR --bundle-signature FILE --wheel FILE --runtime-key KEY
               --collection FILE --inventory FILE --hosts CAR,CAR --keys DIR --car-keys DIR
               [--firmware-map FILE] [--publisher TEXT] [--keep N]

--keys: the update repository's key directory (fleet_keys: the online targets, snapshot and timestamp keys);
the repository itself is created once with `python -m fleet_keys --repo DIR init`. --car-keys: <car>.key for
each car (64 hex digits, made by role rover_pull when it provisions the car).

--firmware-map: JSON {car: {"dir": DIR, "signature": TEXT}} for the cars whose releases carry firmware (role
rover_firmware, tasks_from publish: DIR is the built firmware for the car's board, TEXT the controller's ssh
signature of its firmware.json); a car not in it gets no firmware and its board keeps what it runs.

--inventory: the output of `ansible-inventory --list` (variables as written in the inventory, not rendered:
the car renders them, as a push would). Prints one JSON line (the publication id, its objects' bytes, the
bytes newly written). Exit 1 with one line on stderr on any error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import hashlib
import hmac
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The project's own helpers (PYTHONPATH = the controller's source, as verify_bundle.py).
from fleet_keys.keys import KeyStore, KeyStoreError
from fleet_keys.repository import Repository, RepositoryError
from rover_runtime.bundle import sha256_file
from rover_runtime.metrics import write_json_atomic

TARGET = "publication.json"
CHUNK = 1 << 20
# A firmware directory's files (fleet_firmware build), and the signature beside its manifest.
FIRMWARE_FILES = ("rover_car.hex", "firmware.json")
FIRMWARE_SIGNATURE = "firmware.json.sig"
SSH_SIGNATURE_HEADER = "-----BEGIN SSH SIGNATURE-----"


class PublishError(Exception):
    pass


class Objects:
    """objects/<sha256> under the publication root; counts the bytes it had to write."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "objects"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[str, int] = {}
        self.written = 0

    def add_file(self, path: Path) -> str:
        digest = sha256_file(path)
        target = self.dir / digest
        size = path.stat().st_size
        if not (target.is_file() and target.stat().st_size == size):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{digest}.")
            try:
                with os.fdopen(fd, "wb") as out, path.open("rb") as source:
                    shutil.copyfileobj(source, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                if sha256_file(Path(tmp)) != digest:
                    raise PublishError(f"{path} changed while it was being published")
                Path(tmp).chmod(0o644)
                Path(tmp).replace(target)
            except BaseException:
                with contextlib.suppress(OSError):
                    Path(tmp).unlink()
                raise
            self.written += size
        self.sizes[digest] = size
        return digest

    def add_bytes(self, data: bytes) -> str:
        with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".blob.", delete=False) as handle:
            handle.write(data)
        try:
            return self.add_file(Path(handle.name))
        finally:
            Path(handle.name).unlink(missing_ok=True)


def normalized(collection: Path) -> bytes:
    """The collection tarball with every time stamp zeroed: `ansible-galaxy collection build` stamps its
    MANIFEST.json, FILES.json and gzip header with the build time, so unchanged content would otherwise be a
    new object (and a new download for every car) at every publication."""
    buffer = io.BytesIO()
    with (
        tarfile.open(collection) as source,
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as packed,
        tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as out,
    ):
        for member in source.getmembers():
            data = source.extractfile(member) if member.isfile() else None
            member.mtime = 0
            member.pax_headers = {}
            out.addfile(member, data)
    return buffer.getvalue()


def car_key(directory: Path, car: str) -> bytes:
    """The car's pull key (32 bytes) from <directory>/<car>.key, which role rover_pull made."""
    path = directory / f"{car}.key"
    try:
        key = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise PublishError(
            f"{car} has no pull key ({path}): provision it with rover_pull_enabled true "
            "(playbooks/provision.yml --tags rover_pull makes the key and gives it to the car)"
        ) from None
    except ValueError:
        raise PublishError(f"{path} is not a pull key (64 hex digits)") from None
    if len(key) != 32:
        raise PublishError(f"{path} is not a pull key (64 hex digits)")
    return key


def seal(key: bytes, car: str, entry: bytes) -> bytes:
    """`entry` encrypted and authenticated for `car` (AES-256-GCM, the car's name as associated data, so an
    entry cannot be passed off as another car's). The nonce is derived from the key and the content: the same
    entry seals to the same object (no new download for an unchanged car), different entries never share a
    nonce."""
    aad = f"rover-pull car {car}".encode()
    nonce = hmac.new(key, aad + b"\0" + entry, hashlib.sha256).digest()[:12]
    return nonce + AESGCM(key).encrypt(nonce, entry, aad)


def bundle_files(bundle: Path) -> list[Path]:
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        raise PublishError(f"{bundle} is not a bundle: no manifest.json")
    return sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json.sig")


def cars_from_inventory(inventory: dict[str, Any], hosts: list[str]) -> dict[str, dict[str, Any]]:
    """Each car's groups (with their parents) and variables, without the connection variables (ansible_*):
    on the car the playbook runs with a local connection."""
    hostvars = inventory.get("_meta", {}).get("hostvars", {})
    parents: dict[str, set[str]] = {}
    direct: dict[str, set[str]] = {}
    for group, body in inventory.items():
        if group == "_meta" or not isinstance(body, dict):
            continue
        for child in body.get("children", []):
            parents.setdefault(child, set()).add(group)
        for host in body.get("hosts", []):
            direct.setdefault(host, set()).add(group)
    cars: dict[str, dict[str, Any]] = {}
    for host in hosts:
        if host not in hostvars and host not in direct:
            raise PublishError(f"{host} is not in the inventory")
        groups: set[str] = set()
        todo = list(direct.get(host, ()))
        while todo:
            group = todo.pop()
            if group not in groups:
                groups.add(group)
                todo.extend(parents.get(group, ()))
        groups -= {"all", "ungrouped"}
        variables = {k: v for k, v in hostvars.get(host, {}).items() if not k.startswith("ansible_")}
        cars[host] = {"groups": sorted(groups), "vars": variables}
    return cars


def read_firmware_map(path: Path, cars: dict[str, dict[str, Any]]) -> dict[str, tuple[Path, str]]:
    """Each car's firmware directory and signature from the --firmware-map file, checked before anything is
    written: a car not published, a directory without a built firmware or a signature that is not an ssh
    signature is refused, naming the car."""
    try:
        wanted = json.loads(path.read_text())
    except ValueError as exc:
        raise PublishError(f"--firmware-map {path} is not JSON: {exc}") from None
    if not isinstance(wanted, dict):
        raise PublishError(f"--firmware-map {path} must map each car to its firmware")
    firmware: dict[str, tuple[Path, str]] = {}
    for car, spec in sorted(wanted.items()):
        if car not in cars:
            raise PublishError(f"--firmware-map names {car}, which is not among the cars published (--hosts)")
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("dir"), str)
            and isinstance(spec.get("signature"), str)
        ):
            raise PublishError(f"{car}: its firmware needs a directory (dir) and a signature (signature)")
        directory = Path(spec["dir"])
        missing = [name for name in FIRMWARE_FILES if not (directory / name).is_file()]
        if missing:
            raise PublishError(
                f"{car}: firmware directory {directory} lacks {', '.join(missing)} (not a built firmware)"
            )
        signature = spec["signature"].strip()
        if not signature.startswith(SSH_SIGNATURE_HEADER):
            raise PublishError(f"{car}: the signature of {directory}/firmware.json is not an ssh signature")
        firmware[car] = (directory, signature)
    return firmware


def firmware_files(directory: Path, signature: str, objects: Objects) -> dict[str, str]:
    """A car's firmware entry: {file name: sha256}, the files added to `objects`."""
    files = {name: objects.add_file(directory / name) for name in FIRMWARE_FILES}
    files[FIRMWARE_SIGNATURE] = objects.add_bytes(f"{signature}\n".encode())
    return files


def publish(args: argparse.Namespace) -> dict[str, Any]:
    root: Path = args.root
    repository = Repository(root, KeyStore(args.keys))
    if not repository.exists():
        raise PublishError(
            f"{root} holds no update repository: create its keys and metadata once with "
            f"`python -m fleet_keys --repo {root} --keys {args.keys} init` (it asks for a passphrase for the "
            "root key; docs/pull.md)"
        )
    hosts = [name for name in args.hosts.split(",") if name]
    if not hosts:
        raise PublishError("--hosts names no car")
    cars = cars_from_inventory(json.loads(args.inventory.read_text()), hosts)
    keys = {name: car_key(args.car_keys, name) for name in cars}  # every car's, before anything is written
    firmware = read_firmware_map(args.firmware_map, cars) if args.firmware_map is not None else {}
    objects = Objects(root)
    bundle_entry: dict[str, str] = {}
    for path in bundle_files(args.bundle):
        bundle_entry[path.relative_to(args.bundle).as_posix()] = objects.add_file(path)
    bundle_entry["manifest.json.sig"] = objects.add_bytes(args.bundle_signature.read_bytes())
    for name, (directory, signature) in firmware.items():
        cars[name]["firmware"] = firmware_files(directory, signature, objects)
    content = {
        "bundle": {"files": bundle_entry},
        "runtime": {
            "wheel": args.wheel.name,
            "sha256": objects.add_file(args.wheel),
            "key": args.runtime_key,
        },
        "collection": {
            "file": args.collection.name,
            "sha256": objects.add_bytes(normalized(args.collection)),
        },
        "cars": {
            name: objects.add_bytes(
                seal(keys[name], name, json.dumps(entry, sort_keys=True, indent=1).encode())
            )
            for name, entry in sorted(cars.items())
        },
    }
    publication_id = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    payload = {
        "id": publication_id,
        "published_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "publisher": args.publisher,
        "objects": dict(sorted(objects.sizes.items())),
        **content,
    }
    text = json.dumps(payload, sort_keys=True, indent=1)
    write_json_atomic(root / "publications" / f"{publication_id}.json", payload, durable=True)
    custom = {
        "rover": {
            "publication": publication_id,
            "hosts": sorted(cars),
            "published_at": payload["published_at"],
        }
    }
    try:
        version = repository.publish(TARGET, text.encode(), custom)
    except (RepositoryError, KeyStoreError) as exc:
        raise PublishError(f"signing the publication: {exc}") from None
    removed = prune(root, args.keep, publication_id)
    return {
        "id": publication_id,
        "targets_version": version,
        "cars": len(cars),
        "objects": len(objects.sizes),
        "bytes": sum(objects.sizes.values()),
        "bytes_written": objects.written,
        "objects_removed": removed,
    }


def prune(root: Path, keep: int, current: str) -> int:
    """Objects no longer named by the newest `keep` publications (the current one always among them)."""
    publications = sorted(
        (root / "publications").glob("*.json"), key=lambda p: (p.stem == current, p.stat().st_mtime)
    )
    kept = publications[-keep:]
    for old in publications[:-keep]:
        old.unlink(missing_ok=True)
    needed: set[str] = set()
    for path in kept:
        needed.update(json.loads(path.read_text())["objects"])
    removed = 0
    for entry in (root / "objects").iterdir():
        if entry.name not in needed and not entry.name.startswith("."):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--bundle-signature", type=Path, required=True)
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--runtime-key", required=True)
    parser.add_argument("--collection", type=Path, required=True)
    parser.add_argument("--inventory", type=Path, required=True)
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--car-keys", type=Path, required=True)
    parser.add_argument("--firmware-map", type=Path)
    parser.add_argument("--publisher", default="")
    parser.add_argument("--keep", type=int, default=2)
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error("--keep must be at least 1")
    try:
        result = publish(args)
    except (PublishError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
