"""Which transfer moves heavy files (a wheelhouse) to N cars with the least controller work; prints JSON.

    python benchmarks/heavy_files.py [--sizes 10,50] [--payload DIR] [--base-port 2471] [--out FILE]

For each N, boots N simulated trixie cars and puts the payload directory (default: the newest aarch64
wheelhouse in $ROVER_CACHE/wheelhouse, what a Pi's venv is installed from, torch included) on every car, with
each method, twice: onto an empty directory (cold), then again with nothing changed (warm):
  copy         ansible.builtin.copy of the directory (per file: checksums compared, sent over SSH)
  synchronize  ansible.posix.synchronize (rsync over SSH from the controller, sizes and times compared)
  http         what provisioning does (rover_python_wheelhouse_transfer http): the car fetches from the
               controller's server (roles/rover_python/files/serve_wheelhouses.py) every file of SHA256SUMS it
               lacks, each checked against its sha256, SHA256SUMS and requirements.txt against the hashes
               computed here (roles/rover_python/files/fetch_wheelhouse.py)
Each run reports what benchmarks/fleet_scale.py reports (wall time, the controller's CPU seconds including
its ssh connection masters and, for http, the HTTP server; the cars' CPU seconds; the bytes sent, over SSH
or HTTP),
in total and per car. Every run ends with `sha256sum --check` of every file on every car.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchmarks.fleet_scale import Phase, emit, run_phase  # noqa: E402
from rover_runtime.bundle import sha256_file  # noqa: E402
from simfleet.testing import running_fleet  # noqa: E402

ROLE_FILES = HERE.parent / "roles" / "rover_python" / "files"
METHODS = ("copy", "synchronize", "http")
PLAYBOOK = HERE / "transfer" / "transfer.yml"


def default_payload() -> Path:
    root = Path(os.environ.get("ROVER_CACHE", Path.home() / ".cache" / "rover")) / "wheelhouse"
    candidates = sorted(root.glob("*_aarch64/cp*/SHA256SUMS"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(
            f"no aarch64 wheelhouse under {root}: pass --payload DIR (a directory with SHA256SUMS)"
        )
    return candidates[-1].parent


def measure(size: int, payload: Path, base_port: int, work: Path) -> dict[str, Any]:
    control_dir = work / f"cp-{size}"
    control_dir.mkdir()
    facts = work / f"facts-{size}"
    server_pid = work / f"http-{size}.pid"
    result: dict[str, Any] = {"cars": size, "methods": {}}
    with running_fleet(f"transfer{size}", hosts=size, base_port=base_port, releases=("trixie",)) as fleet:
        ready = work / f"http-{size}.json"
        server = subprocess.Popen(
            [
                sys.executable,
                str(ROLE_FILES / "serve_wheelhouses.py"),
                f"--root={payload}",
                "--bind=127.0.0.1",
                f"--ready-file={ready}",
                "--idle-exit=3600",
            ]
        )
        try:
            while not ready.exists():
                if server.poll() is not None:
                    raise SystemExit("the wheelhouse server did not start")
                time.sleep(0.1)
            url = f"http://127.0.0.1:{json.loads(ready.read_text())['port']}"
            server_pid.write_text(str(server.pid))
            for method in METHODS:
                dest = f"/opt/transfer-{method}"
                args = (
                    "-e",
                    json.dumps(
                        {
                            "transfer_method": method,
                            "transfer_src": str(payload),
                            "transfer_dest": dest,
                            "transfer_url": url,
                            "transfer_sums_sha256": sha256_file(payload / "SHA256SUMS"),
                            "transfer_requirements_sha256": sha256_file(payload / "requirements.txt"),
                        }
                    ),
                )
                runs: dict[str, Phase] = {}
                for run in ("cold", "warm"):
                    runs[run], _ = run_phase(
                        fleet,
                        control_dir,
                        PLAYBOOK,
                        *args,
                        facts=facts,
                        extra=server_pid,
                    )
                result["methods"][method] = {name: asdict(phase) for name, phase in runs.items()}
                # Room for the next method on the cars' disks.
                subprocess.run(
                    [
                        str(Path(sys.executable).parent / "ansible"),
                        "-i",
                        fleet.inventory,
                        "rovers",
                        "-b",
                        "-m",
                        "ansible.builtin.file",
                        "-a",
                        f"path={dest} state=absent",
                    ],
                    cwd=HERE.parent,
                    env={**os.environ, "ANSIBLE_CONFIG": str(HERE.parent / "ansible.cfg")},
                    capture_output=True,
                    check=False,
                )
        finally:
            server.terminate()
            server.wait(timeout=10)
        result["load_average_at_end"] = os.getloadavg()
    subprocess.run(["pkill", "-f", f"ssh: {control_dir}"], check=False)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50")
    parser.add_argument("--payload", type=Path)
    parser.add_argument("--base-port", type=int, default=2471)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    payload = (args.payload or default_payload()).resolve()
    files = [p for p in payload.iterdir() if p.is_file()]
    report: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "payload": {"dir": str(payload), "files": len(files), "bytes": sum(p.stat().st_size for p in files)},
        "sizes": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="heavy-files-") as tmp:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            report["sizes"][str(size)] = measure(size, payload, args.base_port, Path(tmp))
            print(json.dumps({str(size): report["sizes"][str(size)]}), file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - started)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
