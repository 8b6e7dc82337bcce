#!/usr/bin/env python3
"""fetch.py URL DEST: download into DEST every file of URL/SHA256SUMS that DEST lacks or holds with another
sha256 (each checked before it is renamed into place); prints {"fetched": n, "bytes": b}. Standard library."""

import hashlib
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    url, dest = sys.argv[1].rstrip("/"), Path(sys.argv[2])
    with urllib.request.urlopen(f"{url}/SHA256SUMS", timeout=60) as response:
        sums = response.read()
    fetched = received = 0
    wanted = [line.split(maxsplit=1) for line in sums.decode().splitlines() if line.strip()]
    for digest, listed in wanted:
        name = listed.lstrip("*")
        target = dest / name
        if target.is_file() and sha256(target) == digest:
            continue
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        tmp = Path(tmp_name)
        check = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(f"{url}/{name}", timeout=60) as response:
            while block := response.read(1 << 20):
                check.update(block)
                out.write(block)
                received += len(block)
        if check.hexdigest() != digest:
            tmp.unlink()
            print(f"{name}: sha256 mismatch", file=sys.stderr)
            return 1
        tmp.chmod(0o644)
        tmp.replace(target)
        fetched += 1
    (dest / "SHA256SUMS").write_bytes(sums)
    print(json.dumps({"fetched": fetched, "bytes": received}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
