"""The signing keys of the fleet's update repository: one ed25519 key per TUF role (root, targets, snapshot,
timestamp), kept apart from every cache.

- The root key signs only root metadata (which keys the cars trust for each role). It is encrypted with a
  passphrase (PKCS#8, the best encryption `cryptography` offers) and is meant to live offline: `--keys` on a
  removable disk, plugged in to rotate or revoke a key.
- The targets key signs releases; the snapshot and timestamp keys sign the repository's state and freshness
  (short-lived metadata, re-signed by `refresh`). These three are online: unencrypted, so that a publish or a
  timer can use them, but readable by their owner only.

A key is two files in the key directory (0700): `<role>-<keyid[:16]>.pem` (the private key, 0600) and
`<role>-<keyid[:16]>.pub.json` (the public key as TUF names it). A directory or key file that others can
read is refused, as is a root key without a passphrase.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner, SSlibKey

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")


class KeyStoreError(Exception):
    """A key cannot be made, found or used: one sentence naming the file and what to do."""


def default_key_dir() -> Path:
    """$ROVER_KEYS, else ~/.config/rover/keys: never under $ROVER_CACHE (the pip and model caches)."""
    configured = os.environ.get("ROVER_KEYS")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rover" / "keys"


@dataclass(frozen=True)
class KeyStore:
    directory: Path

    def _prepare(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.check_private()

    def check_private(self) -> None:
        """Refuse a key directory or key file that anyone but its owner can read or write."""
        if not self.directory.is_dir():
            raise KeyStoreError(
                f"{self.directory} does not exist: create the keys with `python -m fleet_keys init`"
            )
        for path in [self.directory, *self.directory.glob("*.pem")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077:
                raise KeyStoreError(
                    f"{path} is readable or writable by others (mode {mode:04o}): chmod go-rwx {path} and "
                    "think about whether the key must be replaced"
                )

    def create(self, role: str, passphrase: bytes | None = None) -> SSlibKey:
        """A new key for `role`; the root key needs a passphrase (it is written encrypted)."""
        if role not in ROLES:
            raise KeyStoreError(f"{role!r} is not a role: one of {', '.join(ROLES)}")
        if role == "root" and not passphrase:
            raise KeyStoreError("a root key needs a passphrase: it is stored encrypted and kept offline")
        self._prepare()
        signer = CryptoSigner.generate_ed25519()
        key = signer.public_key
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        private = signer._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        stem = self.directory / f"{role}-{key.keyid[:16]}"
        _write_new(stem.with_suffix(".pem"), private, 0o600)
        public = json.dumps({"keyid": key.keyid, "role": role, **key.to_dict()}, indent=2, sort_keys=True)
        _write_new(stem.with_suffix(".pub.json"), (public + "\n").encode(), 0o644)
        return key

    def public_keys(self, role: str | None = None) -> list[tuple[str, SSlibKey]]:
        """(role, key) of every key in the directory (of `role` only when given), oldest file first."""
        found = []
        for path in sorted(self.directory.glob("*.pub.json"), key=lambda p: (p.stat().st_mtime, p.name)):
            data = json.loads(path.read_text())
            keyid, key_role = data.pop("keyid"), data.pop("role")
            if role is None or key_role == role:
                found.append((key_role, SSlibKey.from_dict(keyid, data)))
        return found

    def signer(self, key: SSlibKey, passphrase: bytes | None = None) -> CryptoSigner:
        """The signer of `key`, from its private key file (decrypted with `passphrase` when encrypted)."""
        self.check_private()
        matches = list(self.directory.glob(f"*-{key.keyid[:16]}.pem"))
        if not matches:
            raise KeyStoreError(
                f"no private key for key {key.keyid[:16]} in {self.directory}: plug in the disk that holds "
                "it or pass --keys"
            )
        try:
            private = serialization.load_pem_private_key(matches[0].read_bytes(), password=passphrase)
        except TypeError:
            raise KeyStoreError(f"{matches[0]} is encrypted: give its passphrase") from None
        except ValueError:
            raise KeyStoreError(f"{matches[0]}: wrong passphrase, or not a private key") from None
        return CryptoSigner(private, key)

    def remove(self, key: SSlibKey) -> list[Path]:
        """Delete the files of `key` (a revoked key); returns what was removed."""
        removed = []
        for path in self.directory.glob(f"*-{key.keyid[:16]}.*"):
            path.unlink()
            removed.append(path)
        return removed


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, with `mode` from its creation (no moment readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
