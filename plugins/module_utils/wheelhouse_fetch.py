#!/usr/bin/env python3
"""Fetch a wheelhouse from the controller over HTTP into DEST: only the files DEST lacks or holds with
another hash, each checked before it is renamed into place.

Run on the car by the module rover.fleet.rover_wheelhouse_fetch (the rover_python role), on the Python
Ansible uses there (3.11 on bookworm, 3.13 on trixie); standard library only; also a script. Nothing from
the server is trusted as it comes: SHA256SUMS and requirements.txt must have the sha256 the controller
computed (``--sums-sha256``, ``--requirements-sha256``), and every wheel the sha256 SHA256SUMS lists. A file
that fails its check, a server that stops answering or a download cut off half-way (the Wi-Fi dropped)
leaves DEST as it was, apart from the files already verified and in place; the next run fetches only what
is still missing. SHA256SUMS and requirements.txt are written last, so a DEST with a SHA256SUMS is complete.

    wheelhouse_fetch.py --url URL --dest DIR --sums-sha256 HEX --requirements-sha256 HEX [--timeout S]

`fetch_explained` returns {"fetched": files, "bytes": bytes received} (the module's result; the script
prints it) or raises FetchError with one sentence (the module's msg; the script's stderr and exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

try:  # the module: its collection's module_utils (AnsiballZ ships it beside this one)
    from ansible_collections.rover.fleet.plugins.module_utils.release_state import (  # type: ignore[import-untyped]
        sha256_file,
    )
except ImportError:  # the script, run from plugins/module_utils: the file beside it
    from release_state import sha256_file

SUMS = "SHA256SUMS"
REQUIREMENTS = "requirements.txt"
BLOCK = 1 << 20


class FetchError(Exception):
    """One sentence for the operator."""


def download(url: str, dest: Path, name: str, expected: str, timeout: float) -> int:
    """URL/name -> dest/name when its sha256 is `expected`; returns the bytes received."""
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(f"{url}/{name}", timeout=timeout) as response:
            while block := response.read(BLOCK):
                digest.update(block)
                out.write(block)
                received += len(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise FetchError(
                f"{name} from {url} ({received} bytes) has sha256 {digest.hexdigest()[:16]}..., not the "
                f"{expected[:16]}... the controller listed: refused (a download cut short, or a changed or "
                "corrupted file on the server)"
            )
        tmp.chmod(0o644)
        tmp.replace(dest / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return received


def read_list(url: str, name: str, expected: str, timeout: float) -> bytes:
    with urllib.request.urlopen(f"{url}/{name}", timeout=timeout) as response:
        data: bytes = response.read()
    if hashlib.sha256(data).hexdigest() != expected:
        raise FetchError(
            f"{name} from {url} is not the controller's (sha256 {hashlib.sha256(data).hexdigest()[:16]}..., "
            f"expected {expected[:16]}...): refused"
        )
    return data


def parse_sums(data: bytes) -> list[tuple[str, str]]:
    entries = []
    for line in data.decode().splitlines():
        if not line.strip():
            continue
        digest, _, listed = line.partition("  ")
        name = listed.lstrip("*")
        if len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise FetchError(f"{SUMS}: not a line of sha256sum output: {line!r}")
        entries.append((digest, name))
    return entries


def fetch(url: str, dest: Path, sums_sha256: str, requirements_sha256: str, timeout: float) -> dict[str, int]:
    url = url.rstrip("/")
    dest.mkdir(parents=True, exist_ok=True)
    sums = read_list(url, SUMS, sums_sha256, timeout)
    requirements = read_list(url, REQUIREMENTS, requirements_sha256, timeout)
    (dest / SUMS).unlink(missing_ok=True)  # incomplete until every wheel is in place
    fetched = received = 0
    for digest, name in parse_sums(sums):
        target = dest / name
        if target.is_file() and sha256_file(target) == digest:
            continue
        received += download(url, dest, name, digest, timeout)
        fetched += 1
    for name, data in ((REQUIREMENTS, requirements), (SUMS, sums)):
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).chmod(0o644)
        Path(tmp).replace(dest / name)
    return {"fetched": fetched, "bytes": received}


def fetch_explained(
    url: str, dest: Path, sums_sha256: str, requirements_sha256: str, timeout: float
) -> dict[str, int]:
    """`fetch`, with every way it can fail as one FetchError sentence for the operator."""
    try:
        return fetch(url, dest, sums_sha256, requirements_sha256, timeout)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        raise FetchError(f"cannot fetch {exc.url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(
            f"cannot fetch the wheelhouse from {url}: {reason}; check that the car reaches the "
            "controller (rover_python_wheelhouse_http_url, a firewall on the controller), or use "
            "rover_python_wheelhouse_transfer=copy"
        ) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wheelhouse_fetch.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--sums-sha256", required=True)
    parser.add_argument("--requirements-sha256", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        result = fetch_explained(
            args.url, args.dest, args.sums_sha256, args.requirements_sha256, args.timeout
        )
    except FetchError as exc:
        sys.stderr.write(f"fetch_wheelhouse: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
