"""python -m fleet_keys: the update repository's keys and metadata, from creation to revocation.

    python -m fleet_keys [--repo DIR] [--keys DIR] init            keys for root, targets, snapshot, timestamp
    python -m fleet_keys [--repo DIR] [--keys DIR] status          roles, key ids, versions and expiry
    python -m fleet_keys [--repo DIR] [--keys DIR] publish NAME FILE [--custom JSON]
    python -m fleet_keys [--repo DIR] [--keys DIR] refresh         re-sign what expires soon (a daily timer)
    python -m fleet_keys [--repo DIR] [--keys DIR] rotate ROLE     a new key for ROLE (the old one is dropped)
    python -m fleet_keys [--repo DIR] [--keys DIR] add-key ROLE    one more key for ROLE (a spare)
    python -m fleet_keys [--repo DIR] [--keys DIR] revoke KEYID    remove one key (a lost or stolen one)

The root key's passphrase is asked for (or read from $ROVER_ROOT_PASSPHRASE) by init, rotate, add-key and
revoke, the only commands that sign root metadata. --repo defaults to out/publish (where publish.yml
writes, served to the cars), --keys to $ROVER_KEYS or ~/.config/rover/keys (never beside the caches). Exit 0
when done, 2 with one line on stderr when refused.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from fleet_keys.keys import ROLES, KeyStore, KeyStoreError, default_key_dir
from fleet_keys.repository import Repository, RepositoryError


def _passphrase(confirm: bool) -> bytes:
    given = os.environ.get("ROVER_ROOT_PASSPHRASE")
    if given is not None:
        return given.encode()
    first = getpass.getpass("root key passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise RepositoryError("the two passphrases differ")
    return first.encode()


def _status(repo: Repository) -> dict[str, object]:
    root = repo.root()
    roles = {}
    for role in ROLES:
        md, _ = repo._latest(role)
        roles[role] = {
            "version": md.signed.version,
            "expires": md.signed.expires.isoformat(),
            "keys": [keyid[:16] for keyid in root.roles[role].keyids],
            "threshold": root.roles[role].threshold,
        }
    return {"repository": str(repo.directory), "keys": str(repo.keys.directory), "roles": roles,
            "targets": sorted(repo.targets().targets)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet_keys", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("out/publish"))
    parser.add_argument(
        "--keys", type=Path, default=None, help="the key directory (default ~/.config/rover/keys)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create the keys and the first metadata")
    sub.add_parser("status", help="roles, keys, versions, expiry")
    p = sub.add_parser("publish", help="sign a new targets version naming NAME")
    p.add_argument("name")
    p.add_argument("file", type=Path)
    p.add_argument("--custom", default="{}", help="JSON object recorded with the target")
    sub.add_parser("refresh", help="re-sign the timestamp (and what expires within a week)")
    p = sub.add_parser("rotate", help="replace ROLE's key")
    p.add_argument("role", choices=ROLES)
    p = sub.add_parser("add-key", help="one more key for ROLE")
    p.add_argument("role", choices=ROLES)
    p = sub.add_parser("revoke", help="remove a key from the root")
    p.add_argument("keyid", help="a key id or a unique prefix of one (status lists them)")
    args = parser.parse_args(argv)
    repo = Repository(args.repo, KeyStore(args.keys or default_key_dir()))
    try:
        if args.command == "init":
            repo.init(_passphrase(confirm=True))
            result: object = _status(repo)
        elif args.command == "status":
            result = _status(repo)
        elif args.command == "publish":
            try:
                custom = json.loads(args.custom)
                data = args.file.read_bytes()
            except (OSError, ValueError) as exc:
                raise RepositoryError(f"publish: {exc}") from None
            if not isinstance(custom, dict):
                raise RepositoryError("--custom must be a JSON object")
            result = {"targets_version": repo.publish(args.name, data, custom)}
        elif args.command == "refresh":
            result = {"signed": repo.refresh()}
        elif args.command == "rotate":
            key = repo.rotate(args.role, _passphrase(confirm=False))
            result = {"role": args.role, "new_key": key.keyid[:16], "root_version": repo.root().version}
        elif args.command == "add-key":
            key = repo.add_key(args.role, _passphrase(confirm=False))
            result = {"role": args.role, "new_key": key.keyid[:16], "root_version": repo.root().version}
        else:
            role, key = repo.revoke(args.keyid, _passphrase(confirm=False))
            result = {"role": role, "revoked": key.keyid[:16], "root_version": repo.root().version}
    except (RepositoryError, KeyStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
