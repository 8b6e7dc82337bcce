#!/usr/bin/env python3
"""Verify a model bundle with rover_runtime.bundle.open_bundle and print what a release needs, as JSON.

    verify_bundle.py BUNDLE_DIR [--expect-hash HASH] [--sizes-only]

Runs on the controller (before anything is sent) and on the car through its venv python (before a release
is activated). Every sha256 and size in the manifest is checked and unlisted files are refused. Exit 0
with a JSON object on stdout; exit 1 with a one-line error on stderr naming the file or key at fault.
"""

from __future__ import annotations

import argparse
import json
import sys

from rover_runtime.bundle import BundleError, open_bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--expect-hash", default="", help="fail unless the bundle's content hash is this")
    parser.add_argument(
        "--sizes-only", action="store_true", help="check schema, listing and sizes but not the sha256s"
    )
    args = parser.parse_args()
    try:
        bundle = open_bundle(args.bundle, verify_hashes=not args.sizes_only)
    except BundleError as exc:
        print(f"verify_bundle: {exc}", file=sys.stderr)
        return 1
    manifest = bundle.manifest
    if args.expect_hash and manifest.content_hash != args.expect_hash:
        print(
            f"verify_bundle: bundle {args.bundle}: content hash {manifest.content_hash} is not the expected "
            f"{args.expect_hash}",
            file=sys.stderr,
        )
        return 1
    result = {
        "path": str(bundle.root),
        "content_hash": manifest.content_hash,
        "model_file": manifest.model_file,
        "model_bytes": manifest.model_bytes,
        "bundle_bytes": sum(entry.size for entry in manifest.files),
        "files": len(manifest.files),
        "mode": manifest.mode,
        "backend": manifest.backend,
        "engine": manifest.engine,
        "created_at": manifest.created_at,
    }
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
