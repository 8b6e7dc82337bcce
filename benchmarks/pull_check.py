"""What a pull costs when nothing changed, what publishing costs the controller, and the agent's memory; JSON.

    python benchmarks/pull_check.py [--cars 50] [--checks 20] [--out FILE]

Issue #27's numbers, measured without a fleet (the agent and the publisher are the programs the cars and the
controller run, each as a process of its own):

- publish   roles/rover_release/files/publish.py for --cars cars (one entry each in the publication), signing
            into an update repository (TUF, fleet_keys): the controller's CPU seconds (user + system), wall
            seconds, and the sizes of timestamp.json and the publication; then again with nothing changed.
- check     roles/rover_pull/files/rover_pull.py on a car that has applied the publication (its state.json
            says so) and checked once, --checks times against a local HTTP server: CPU milliseconds per check,
            the file bytes the server sent per check (its 404 for the next root version is not counted: a
            few hundred bytes of HTML), and the agent's peak RSS. The issue's goal for a check is "timestamp
            only, <= 2 KB".
- memory    the agent's peak RSS on a 400 MB timestamp.json (refused past 16 KiB) and on one nested too
            deeply for the parser; the goal is <= 64 MB under any input.

The bundle is a tiny ONNX bundle and the wheel and collection are small stand-ins: neither is downloaded by an
unchanged check, and the publisher's cost is dominated by the per-car entries and the signature. Record the
CPU model and the load average (both in the report); run on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fleet_keys.keys import KeyStore
from fleet_keys.repository import Repository
from rover_runtime.testing import write_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "roles" / "rover_pull" / "files" / "rover_pull.py"
PUBLISH = REPO / "roles" / "rover_release" / "files" / "publish.py"

# A child's resource use, read by a wrapper whose only child it is (RUSAGE_CHILDREN of a fresh process).
MEASURE = (
    "import json, resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)\n"
    "use = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "cpu = use.ru_utime + use.ru_stime\n"
    "print(json.dumps({'rc': done.returncode, 'cpu_s': cpu, 'maxrss_kib': use.ru_maxrss}))\n"
)


class CountingHandler(SimpleHTTPRequestHandler):
    sent: list[int]  # set per server: bytes of file bodies sent

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        before = source.tell()
        # A client that stops reading (the agent refusing an oversized file) ends the copy.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().copyfile(source, outputfile)
        self.sent.append(source.tell() - before)


def measure(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def mib(use: dict[str, Any]) -> float:
    return float(round(use["maxrss_kib"] / 1024, 1))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def stand_ins(work: Path, cars: int) -> dict[str, Path]:
    Repository(work / "publish", KeyStore(work / "keys" / "tuf")).init(b"benchmark root passphrase")
    key = work / "keys" / "signing"
    key.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    bundle = write_tiny_bundle(work / "bundle")
    wheel = work / "rover_fleet-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("rover_runtime/__init__.py", "")
    playbook = work / "deploy.yml"
    playbook.write_text("---\n")
    collection = work / "rover-fleet-0.1.0.tar.gz"
    with tarfile.open(collection, "w:gz") as archive:
        archive.add(playbook, arcname="playbooks/deploy.yml")
    hostvars = {f"car{i}": {"ansible_host": f"10.0.{i // 250}.{i % 250 + 1}"} for i in range(1, cars + 1)}
    (work / "keys" / "cars").mkdir(mode=0o700)
    for name in hostvars:  # each car's pull key, as role rover_pull makes them
        (work / "keys" / "cars" / f"{name}.key").write_text(os.urandom(32).hex() + "\n")
    inventory = work / "inventory.json"
    inventory.write_text(
        json.dumps({"_meta": {"hostvars": hostvars}, "rovers": {"hosts": sorted(hostvars)}, "all": {}})
    )
    signature = work / "manifest.json.sig"
    signed = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", "rover-bundle"],
        input=(bundle / "manifest.json").read_bytes(),
        capture_output=True,
        check=True,
    )
    signature.write_bytes(signed.stdout)
    return {"keys": work / "keys" / "tuf", "bundle": bundle, "wheel": wheel, "collection": collection,
            "inventory": inventory, "signature": signature}  # fmt: skip


def publish(root: Path, files: dict[str, Path], cars: int) -> dict[str, Any]:
    argv = [
        sys.executable, str(PUBLISH), "--root", str(root), "--bundle", str(files["bundle"]),
        "--bundle-signature", str(files["signature"]), "--wheel", str(files["wheel"]),
        "--runtime-key", "key-1",
        "--collection", str(files["collection"]), "--inventory", str(files["inventory"]),
        "--hosts", ",".join(f"car{i}" for i in range(1, cars + 1)), "--keys", str(files["keys"]),
        "--car-keys", str(files["keys"].parent / "cars"),
    ]  # fmt: skip
    started = time.monotonic()
    use = measure(argv)
    wall = time.monotonic() - started
    if use["rc"] != 0:
        raise SystemExit(f"publish.py exited {use['rc']}: run it by hand to see why")
    return {"cpu_s": round(use["cpu_s"], 3), "wall_s": round(wall, 3)}


def car_config(work: Path, url: str, root: Path, publication: str) -> Path:
    car = work / "car"
    car.mkdir()
    shutil.copyfile(root / "metadata" / "root.json", car / "root.json")
    shutil.copyfile(work / "keys" / "cars" / "car1.key", car / "pull.key")
    state = car / "state"
    state.mkdir()
    (state / "state.json").write_text(
        json.dumps({"publication": publication, "outcome": "applied", "attempts": 1, "release": "r"})
    )
    config = car / "pull.json"
    config.write_text(
        json.dumps(
            {"url": url, "car": "car1", "state_dir": str(state), "venv": str(car / "venv"),
             "trusted_root": str(car / "root.json"), "car_key": str(car / "pull.key"),
             "metrics_path": str(car / "metrics.json"),
             "timeout_s": 10}
        )
    )  # fmt: skip
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cars", type=int, default=50, help="cars in the publication")
    parser.add_argument("--checks", type=int, default=20, help="unchanged checks to measure")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.cars < 1 or args.checks < 1:
        parser.error("--cars and --checks must be at least 1")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="pull-check-"))
    try:
        files = stand_ins(work, args.cars)
        root = work / "publish"
        first = publish(root, files, args.cars)
        again = publish(root, files, args.cars)
        timestamp = root / "metadata" / "timestamp.json"
        timestamp_bytes = timestamp.stat().st_size
        target = Repository(root, KeyStore(files["keys"])).targets().targets["publication.json"]
        publication = json.loads(
            (root / "targets" / f"{target.hashes['sha256']}.publication.json").read_text()
        )["id"]

        sent: list[int] = []
        handler = type("Handler", (CountingHandler,), {"sent": sent})
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            agent = [
                sys.executable,
                str(AGENT),
                "--config",
                str(car_config(work, url, root, publication)),
            ]
            warm = measure(agent)  # the car's first check: every metadata file and the publication
            checks = [measure(agent) for _ in range(args.checks)]
            status = json.loads((work / "car" / "state" / "status.json").read_text())
            if status["outcome"] != "up-to-date" or any(c["rc"] != 0 for c in [warm, *checks]):
                raise SystemExit(f"the agent did not find the publication applied: {status}")
            check_bytes = sent[-args.checks :]
            with timestamp.open("wb") as handle:
                handle.truncate(400 << 20)
            huge = measure(agent)
            timestamp.write_text("[" * 8_000)  # within the 16 KiB a timestamp may have
            nested = measure(agent)
        finally:
            server.shutdown()
            server.server_close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu_ms = sorted(c["cpu_s"] * 1000 for c in checks)
    report = {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cars": args.cars,
        "publish": {
            "first": first,
            "unchanged": again,
            "timestamp_json_bytes": timestamp_bytes,
            "publication_json_bytes": target.length,
        },
        "check_unchanged": {
            "checks": args.checks,
            "cpu_ms_median": round(statistics.median(cpu_ms), 1),
            "cpu_ms_max": round(cpu_ms[-1], 1),
            "bytes_per_check": max(check_bytes) if check_bytes else None,
            "goal_bytes": 2048,
            "agent_maxrss_mib": max(mib(c) for c in checks),
        },
        "memory": {
            "goal_mib": 64,
            "timestamp_400mb": {"rc": huge["rc"], "maxrss_mib": mib(huge)},
            "timestamp_nested_8000": {
                "rc": nested["rc"],
                "maxrss_mib": mib(nested),
            },
        },
        "resource_note": "cpu and maxrss are of the agent process (RUSAGE_CHILDREN)",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
