#!/usr/bin/env python3
"""Pull mode on a car: converge to the release the controller published, by the same playbook a push runs.

Run by rover-pull.service (a oneshot started by rover-pull.timer, with a random delay) as root with the car's
venv Python (/opt/rover/venv: python-tuf and ansible-core). Each run:

1. updates the car's copy of the controller's update repository (The Update Framework, tuf.ngclient) from
   <url>/metadata/, starting from the root metadata provisioning pinned (/etc/rover/tuf/root.json): metadata
   older than what the car has seen (a replayed publication) is refused, metadata past its expiry (a server
   frozen on an old publication) is `stale`, a key the newest root does not list (revoked) is refused, and
   every file is bounded by the length its signed parent names; then downloads the target
   `publication.json` (checked against its signed length and sha256);
2. stops when this car is not in the publication, when it was already applied here, when it failed here
   `max_attempts` times or its release failed its health gate here once (it waits for a new publication:
   a car never drives a release known to fail its gate again), or when the car is driving (next period);
3. downloads the files of the publication it does not have yet (content-addressed: <url>/objects/<sha256>,
   each checked against the size and sha256 the signed publication names; a file that does not match is
   refused, nothing of it is used);
4. runs the collection's deploy playbook (rover.fleet.deploy) on this car alone with a local connection:
   the same checks, bundle and firmware signature verification, release build, switch, Arduino flash, health
   gate and automatic rollback as a push from the controller (the firmware is the one the car's entry names,
   built and signed by publish.yml for its board; none when the entry names none);
   The attempt is recorded (fsynced) before it starts; the car's result is read from the file the deploy's
   rover_recap callback writes (ROVER_RESULTS_FILE). Another deploy holding the car's lock, or a car that
   started driving, is a wait for the next period, not a failed attempt;
5. writes what happened to <state dir>/status.json (and the journal).

    rover_pull.py --config /etc/rover/pull.json [--once-now]

Exit 0 when the car is on the published release, has nothing to do, or cannot reach the server (a car out
of range is normal) while its metadata is still fresh; 1 when the publication was refused, its deploy failed,
or the car has had no fresh metadata past its expiry (`stale`, with since when) (the unit is then "failed"
and the status says why); 2 on a bad configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The car's durable JSON writer and sha256, one stdlib file installed beside this one (the deploy's release
# bookkeeping, plugins/module_utils/release_state.py).
from release_state import sha256_file, write_json_atomic, write_text_atomic
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.ngclient import Updater, UpdaterConfig, Urllib3Fetcher

TARGET = "publication.json"
CHUNK = 1 << 20
# The Arduino's firmware in a car's entry (publish.py): the hex, its manifest and the controller's signature.
FIRMWARE_FILES = ("rover_car.hex", "firmware.json", "firmware.json.sig")
# Upper bounds on what the repository may send (tuf refuses a longer file as it arrives): the timestamp is
# about 500 bytes, a publication names a few objects and one small entry per car (about 200 bytes each).
TUF_LIMITS = UpdaterConfig(
    max_root_rotations=32,
    root_max_length=64 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=256 * 1024,
    targets_max_length=4 << 20,
)


class PullError(Exception):
    """The publication is refused (bad signature, bad file) or cannot be applied: one sentence."""


@dataclass
class PullConfig:
    url: str
    car: str
    state_dir: Path
    venv: Path
    trusted_root: Path
    car_key: Path
    metrics_path: Path
    release_root: Path
    force: bool
    max_attempts: int
    timeout_s: float
    extra_vars: dict[str, Any]
    textfile: Path | None = None  # rover_pull.prom for node_exporter's textfile collector (None: none)

    @classmethod
    def load(cls, path: Path) -> PullConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"rover_pull: cannot read the configuration {path}: {exc}") from exc
        missing = [key for key in ("url", "car") if not raw.get(key)]
        if missing:
            raise SystemExit(f"rover_pull: {path} has no {', '.join(missing)}")
        return cls(
            url=str(raw["url"]).rstrip("/"),
            car=str(raw["car"]),
            state_dir=Path(raw.get("state_dir", "/var/lib/rover/pull")),
            venv=Path(raw.get("venv", "/opt/rover/venv")),
            trusted_root=Path(raw.get("trusted_root", "/etc/rover/tuf/root.json")),
            car_key=Path(raw.get("car_key", "/etc/rover/pull.key")),
            metrics_path=Path(raw.get("metrics_path", "/run/rover/metrics.json")),
            release_root=Path(raw.get("release_root", "/opt/rover")),
            force=bool(raw.get("force", False)),
            max_attempts=int(raw.get("max_attempts", 2)),
            timeout_s=float(raw.get("timeout_s", 30)),
            extra_vars=dict(raw.get("extra_vars", {})),
            textfile=Path(raw["textfile"]) if raw.get("textfile") else None,
        )


# Every outcome a run ends with (status.json "outcome"), exported one-hot for Prometheus.
OUTCOMES = (
    "applied", "up-to-date", "unreachable", "stale", "refused", "failed", "not-published", "gave-up",
    "waiting",
)  # fmt: skip
# Label values written as they are: publication and release ids (hex), never free text.
PLAIN_LABEL = re.compile(r"[A-Za-z0-9._:+-]{1,128}")


def iso_to_unix(text: Any) -> float | None:
    try:
        moment = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None
    return moment.timestamp()


def pull_metrics(status: dict[str, Any], state: dict[str, Any]) -> str:
    """This run's status (and the last applied publication, from state.json) as Prometheus exposition text:
    rover_pull_outcome (one-hot), last check, last fresh metadata, stale since, the applied publication."""
    lines = [
        "# HELP rover_pull_outcome how the last pull run ended: 1 for its outcome",
        "# TYPE rover_pull_outcome gauge",
        *(f'rover_pull_outcome{{outcome="{o}"}} {int(status.get("outcome") == o)}' for o in OUTCOMES),
    ]
    stale = status.get("outcome") == "stale"
    for name, key, what in (
        ("rover_pull_last_check_timestamp_seconds", "checked_at", "when the agent last ran"),
        ("rover_pull_last_fresh_timestamp_seconds", "last_fresh_at", "when the car last had fresh metadata"),
        (
            "rover_pull_stale_since_timestamp_seconds",
            "stale_since",
            "since when its newest metadata is expired",
        ),
    ):
        value = iso_to_unix(status.get(key)) if stale or key != "stale_since" else None
        if value is not None:
            lines += [f"# HELP {name} {what} (Unix time)", f"# TYPE {name} gauge", f"{name} {value:.0f}"]
    publication, release = str(state.get("publication", "")), str(state.get("release", ""))
    plain = PLAIN_LABEL.fullmatch(publication) and PLAIN_LABEL.fullmatch(release)
    if state.get("outcome") == "applied" and plain:
        lines += [
            "# HELP rover_pull_applied_info the last publication this car applied, and its release",
            "# TYPE rover_pull_applied_info gauge",
            f'rover_pull_applied_info{{publication="{publication}",release="{release}"}} 1',
        ]
    return "\n".join(lines) + "\n"


def write_metrics(config: PullConfig, status: dict[str, Any]) -> None:
    if config.textfile is None:
        return
    try:
        write_text_atomic(config.textfile, pull_metrics(status, read_json(config.state_dir / "state.json")))
    except OSError as exc:
        log(f"cannot write the metrics file {config.textfile}: {exc}")


def log(message: str) -> None:
    print(f"rover_pull: {message}", flush=True)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_json(text: str | bytes, what: str) -> Any:
    """JSON, or PullError naming `what` (nesting too deep for the parser included)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise PullError(f"{what} is nested too deeply: refused") from None
    except ValueError as exc:
        raise PullError(f"{what} is not JSON: {exc}") from None


class Stale(Exception):
    """The repository's metadata is past its expiry: the server is frozen on an old state (or replays one)."""


class Unreachable(Exception):
    """The server cannot be reached, or a download broke off."""


def _tuf_error(exc: Exception) -> Exception:
    """A tuf failure as this agent's outcome: Stale, Unreachable or PullError (refused), in words."""
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return Stale(str(exc))
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return PullError(f"the server sent more than the signed metadata allows: {exc}")
    if isinstance(exc, tuf_errors.DownloadError):
        return Unreachable(str(exc) or type(exc).__name__)
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return PullError(
            "the server offers metadata older than this car has already seen (an old publication put back): "
            f"{exc}"
        )
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return PullError(f"the update metadata is not signed by the keys this car trusts: {exc}")
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return PullError(
            f"a file on the server is not the one its signed metadata names (changed after signing): {exc}"
        )
    if isinstance(exc, (DeserializationError, SerializationError)):
        cause = exc.__cause__ or exc.__context__
        detail = "nested too deeply" if isinstance(cause, RecursionError) else str(exc)
        return PullError(f"the update metadata is not valid: {detail}")
    if isinstance(exc, tuf_errors.RepositoryError):
        return PullError(f"the update repository is not valid: {exc}")
    return Unreachable(f"{type(exc).__name__}: {exc}")  # urllib3's errors while a download streams


def expired_since(metadata_dir: Path) -> str:
    """When the newest timestamp metadata this car holds expired ("" when it has none, or it has not)."""
    with contextlib.suppress(Exception):
        expires = Metadata.from_file(str(metadata_dir / "timestamp.json")).signed.expires
        since = str(expires.strftime("%Y-%m-%dT%H:%M:%SZ"))
        return since if since <= now_iso() else ""
    return ""


def fetch_publication(config: PullConfig) -> bytes:
    """The publication's bytes, through tuf: every check of the update repository passed. Raises Stale,
    Unreachable or PullError."""
    try:
        bootstrap = config.trusted_root.read_bytes()
    except OSError as exc:
        raise PullError(
            f"cannot read {config.trusted_root}, the update repository's root this car trusts "
            f"(provision the car with rover_pull_enabled): {exc.strerror}"
        ) from None
    metadata_dir = config.state_dir / "tuf"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    try:
        updater = Updater(
            metadata_dir=str(metadata_dir),
            metadata_base_url=f"{config.url}/metadata/",
            target_base_url=f"{config.url}/targets/",
            target_dir=str(config.state_dir),
            fetcher=Urllib3Fetcher(socket_timeout=int(config.timeout_s), app_user_agent="rover-pull"),
            config=TUF_LIMITS,
            bootstrap=bootstrap,
        )
        updater.refresh()
        info = updater.get_targetinfo(TARGET)
        if info is None:
            raise PullError(
                f"the update repository at {config.url} has no {TARGET} yet: nothing was published"
            )
        path = updater.find_cached_target(info, str(config.state_dir / TARGET))
        if path is None:
            tmp = config.state_dir / f".{TARGET}.tmp"
            updater.download_target(info, str(tmp))
            tmp.replace(config.state_dir / TARGET)
            path = str(config.state_dir / TARGET)
        return Path(path).read_bytes()
    except (PullError, OSError):
        raise
    except Exception as exc:  # tuf's errors, urllib3's mid-stream ones: sorted by _tuf_error
        raise _tuf_error(exc) from None


def open_publication(raw: bytes) -> dict[str, Any]:
    """The publication, already verified by tuf against its signed length and hash."""
    data = load_json(raw, "the publication")
    if not isinstance(data, dict):
        raise PullError("the publication is not a JSON object")
    for key in ("id", "objects", "bundle", "runtime", "collection", "cars"):
        if key not in data:
            raise PullError(f"the publication has no {key!r}")
    return dict(data)


def ensure_object(config: PullConfig, digest: str, size: int) -> tuple[Path, int]:
    """The object <digest> in the local cache, downloaded when missing; returns it and the bytes received."""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise PullError(f"the publication names an object {digest!r} that is not a sha256")
    objects = config.state_dir / "objects"
    target = objects / digest
    if target.is_file() and target.stat().st_size == size and sha256_file(target) == digest:
        return target, 0  # a cached object is used only when its content is still the one named
    objects.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=objects, prefix=f".{digest}.")
    tmp = Path(tmp_name)
    received = 0
    try:
        digest_of = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as handle,
            urllib.request.urlopen(  # the configured server
                f"{config.url}/objects/{digest}", timeout=config.timeout_s
            ) as response,
        ):
            while block := response.read(CHUNK):
                received += len(block)
                if received > size:
                    raise PullError(
                        f"object {digest[:12]} is larger than the {size} bytes the publication says"
                    )
                digest_of.update(block)
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        if received != size or digest_of.hexdigest() != digest:
            raise PullError(
                f"object {digest[:12]} does not match the publication ({received} bytes, sha256 "
                f"{digest_of.hexdigest()[:12]}): refused"
            )
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target, received


def open_car_entry(config: PullConfig, sealed: bytes) -> dict[str, Any]:
    """This car's inventory entry, decrypted with its pull key (publish.py's `seal`)."""
    try:
        key = bytes.fromhex(config.car_key.read_text().strip())
        entry = AESGCM(key).decrypt(sealed[:12], sealed[12:], f"rover-pull car {config.car}".encode())
    except OSError as exc:
        raise PullError(f"cannot read this car's pull key {config.car_key}: {exc.strerror}") from None
    except (ValueError, InvalidTag):
        raise PullError(
            f"this car's entry in the publication does not open with {config.car_key}: the controller's key "
            f"for {config.car} differs (provision the car again: playbooks/provision.yml --tags rover_pull)"
        ) from None
    data = load_json(entry, "this car's entry")
    if not isinstance(data, dict):
        raise PullError("this car's entry is not a JSON object")
    return data


def driving(config: PullConfig) -> bool:
    metrics = read_json(config.metrics_path)
    return bool(metrics.get("driving", False))


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def prepare_work(config: PullConfig, channel: dict[str, Any], objects: dict[str, Path]) -> Path:
    """<state>/work/<id>/: the bundle, the wheel and its code, the collection, this car's inventory, vars."""
    work: Path = config.state_dir / "work" / str(channel["id"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bundle = work / "bundle"
    for name, digest in channel["bundle"]["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise PullError(f"bundle file name {name!r} leaves the bundle")
        link_or_copy(objects[digest], bundle / name)
    wheel = work / channel["runtime"]["wheel"]
    link_or_copy(objects[channel["runtime"]["sha256"]], wheel)
    with zipfile.ZipFile(wheel) as archive:  # the runtime's code, for the bundle check before the switch
        archive.extractall(work / "lib")
    collections = work / "collections"
    extract_collection(
        objects[channel["collection"]["sha256"]], collections / "ansible_collections" / "rover" / "fleet"
    )
    car = open_car_entry(config, objects[channel["cars"][config.car]].read_bytes())
    firmware = unpack_firmware(car.get("firmware"), objects, work / "firmware")
    host_vars = dict(car.get("vars", {}))
    host_vars.update(ansible_connection="local", ansible_python_interpreter="/usr/bin/python3")
    inventory: dict[str, Any] = {"all": {"children": {}}}
    for group in car.get("groups", ["rovers"]):
        inventory["all"]["children"][group] = {"hosts": {config.car: {}}}
    inventory["all"]["children"].setdefault("rovers", {"hosts": {config.car: {}}})
    inventory["all"]["children"]["rovers"]["hosts"][config.car] = host_vars
    (work / "inventory.json").write_text(json.dumps(inventory, indent=2))
    extra = {
        "rover_deploy_bundle": str(bundle),
        "rover_deploy_force": config.force,
        # The publication is signed on the controller: the car verifies that signature, it does not sign.
        "rover_release_sign": False,
        "rover_release_controller_python": str(config.venv / "bin" / "python"),
        "rover_release_controller_source": str(work / "lib"),
        "rover_runtime_service_wheel_file": str(wheel),
        "rover_runtime_service_wheel_key": channel["runtime"]["key"],
        "preflight_min_ansible_core_version": "2.19",
        # The simulated car's firmware status lives on the controller: not visible from the car.
        "rover_health_firmware_status_file": "",
        # The Arduino's firmware for this car's board, built, checked and signed by publish.yml: checked here
        # against the runtime it comes with (the wheel's code), its signature on the car, flashed unless the
        # board runs it. Without one (its rover_firmware_manage is false) the board keeps what it runs.
        "rover_firmware_manage": firmware is not None,
        **(
            {
                "rover_firmware_dir": str(firmware),
                "rover_firmware_controller_python": str(config.venv / "bin" / "python"),
                "rover_firmware_controller_source": str(work / "lib"),
            }
            if firmware is not None
            else {}
        ),
        # The fleet's intended release is the controller's to record (publish.yml did), not the car's.
        "rover_deploy_sets_intended": False,
        "rover_pull_publication": channel["id"],
        # The deploy lock is this agent's while it runs: stale at once if the agent dies (or the car reboots).
        "rover_release_lock_pid": os.getpid(),
        **config.extra_vars,
    }
    (work / "vars.json").write_text(json.dumps(extra, indent=2))
    (work / "ansible.cfg").write_text(
        "[defaults]\n"
        "inject_facts_as_vars = False\n"
        "callbacks_enabled = rover.fleet.rover_recap\n"
        "interpreter_python = auto_silent\n"
        "retry_files_enabled = False\n"
        "forks = 1\n"
        f"local_tmp = {work / 'tmp'}\n"
    )
    return work


def unpack_firmware(entry: Any, objects: dict[str, Path], target: Path) -> Path | None:
    """The firmware files the car's entry names (publish.py: the hex, its manifest and the controller's
    signature of it) in `target`; None when the entry names none."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) != set(FIRMWARE_FILES):
        names = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise PullError(f"the car's firmware entry names {names}, not {', '.join(FIRMWARE_FILES)}")
    for name in FIRMWARE_FILES:
        digest = entry[name]
        if not isinstance(digest, str) or digest not in objects:
            raise PullError(
                f"the car's firmware file {name} ({digest}) is not among the publication's objects"
            )
        link_or_copy(objects[digest], target / name)
    return target


def extract_collection(tarball: Path, target: Path) -> None:
    """The collection tarball, refusing members that would land outside `target` (absolute, .., links)."""
    with tarfile.open(tarball) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if Path(member.name).is_absolute() or ".." in parts or not (member.isfile() or member.isdir()):
                raise PullError(f"the collection holds {member.name!r}, which would leave its directory")
        if hasattr(tarfile, "data_filter"):  # Python 3.12+, and 3.11 from 3.11.4
            archive.extractall(target, filter="data")
        else:
            archive.extractall(target)  # every member checked above


RESULTS = "result.json"


@dataclass
class Applied:
    """What the deploy did on this car: the status the rover_recap callback wrote for it (ok, skipped,
    locked, failed, unreachable, not-attempted) and its sentence."""

    status: str
    message: str


def deploy_result(work: Path, car: str, output: str) -> Applied:
    """This car's result from the file the deploy's rover_recap callback wrote (ROVER_RESULTS_FILE), not from
    its printed output; a deploy that wrote none (it crashed or was killed) failed with its output's end."""
    try:
        result = json.loads((work / RESULTS).read_text())["cars"][car]
        status, message = str(result["status"]), str(result["message"])
    except (OSError, ValueError, KeyError, TypeError):
        tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
        return Applied("failed", "the deploy wrote no result: " + (" / ".join(tail) or "no output"))
    return Applied(status, message)


def apply(config: PullConfig, work: Path) -> Applied:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_CONFIG=str(work / "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(work / "collections"),
        ANSIBLE_NOCOLOR="1",
        HOME=env.get("HOME", "/root"),
        ROVER_RESULTS_FILE=str(work / RESULTS),
    )
    (work / RESULTS).unlink(missing_ok=True)
    command = [
        str(config.venv / "bin" / "ansible-playbook"),
        "-i",
        str(work / "inventory.json"),
        "rover.fleet.deploy",
        "-e",
        f"@{work / 'vars.json'}",
    ]
    log(f"applying: {' '.join(command)}")
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    (work / "ansible.log").write_text(output)
    result = deploy_result(work, config.car, output)
    if done.returncode != 0 and result.status == "ok":  # the car was fine, the run (its controller play) not
        return Applied("failed", f"the deploy exited {done.returncode}: {result.message}")
    return result


def current_release(root: Path) -> str:
    """The release `current` names on this car ("" when none)."""
    link = root / "current"
    return link.readlink().name if link.is_symlink() else ""


def releases_failed_since(root: Path, since: float) -> list[str]:
    """Releases the deploy marked bad (their gate failed) at or after `since` (release_state.py's status)."""
    failed = []
    for status_file in sorted((root / "releases").glob("[!.]*/status.json")):
        status = read_json(status_file)
        gated_at = status.get("gated_at")
        if status.get("state") == "bad" and isinstance(gated_at, (int, float)) and gated_at >= since:
            failed.append(status_file.parent.name)
    return failed


def prune(config: PullConfig, keep_objects: set[str], keep_work: str) -> None:
    """Only the current publication's objects and work directory stay on the car."""
    objects = config.state_dir / "objects"
    if objects.is_dir():
        for entry in objects.iterdir():
            if entry.name not in keep_objects:
                entry.unlink(missing_ok=True)
    work = config.state_dir / "work"
    if work.is_dir():
        for entry in work.iterdir():
            if entry.name != keep_work:
                shutil.rmtree(entry, ignore_errors=True)


def run(config: PullConfig) -> int:
    state_path = config.state_dir / "state.json"
    state = read_json(state_path)
    checked_at = now_iso()
    # When the car last had fresh, verified metadata (kept across runs in status.json).
    last_fresh = str(read_json(config.state_dir / "status.json").get("last_fresh_at", ""))
    status: dict[str, Any] = {
        "checked_at": checked_at,
        "url": config.url,
        "car": config.car,
        "last_fresh_at": last_fresh,
    }

    def finish(outcome: str, message: str, code: int, **more: Any) -> int:
        status.update(outcome=outcome, message=message, **more)
        write_json_atomic(config.state_dir / "status.json", status)
        write_metrics(config, status)
        log(f"{outcome}: {message}")
        return code

    try:
        raw = fetch_publication(config)
        channel = open_publication(raw)
    except Stale as exc:
        since = expired_since(config.state_dir / "tuf")
        return finish(
            "stale",
            f"the server's update metadata expired{' at ' + since if since else ''} and was not renewed (a "
            f"frozen or replayed server, or its refresh timer stopped): the car stays on its release ({exc})",
            1,
            stale_since=since or checked_at,
        )
    except Unreachable as exc:
        since = expired_since(config.state_dir / "tuf")
        if since:
            return finish(
                "stale",
                f"cannot reach {config.url}, and the newest update metadata this car has expired at {since}: "
                f"no fresh publication since then ({exc})",
                1,
                stale_since=since,
            )
        return finish("unreachable", f"cannot download the publication from {config.url}: {exc}", 0)
    except PullError as exc:
        return finish("refused", str(exc), 1)
    except OSError as exc:
        return finish("failed", f"the car's disk: {exc}", 1)
    status["last_fresh_at"] = checked_at
    publication = channel["id"]
    status["publication"] = publication
    if config.car not in channel["cars"]:
        return finish("not-published", f"publication {publication} has no entry for {config.car}", 0)
    if state.get("publication") == publication:
        if state.get("outcome") == "applied":
            return finish(
                "up-to-date",
                f"publication {publication} is applied",
                0,
                release=state.get("release"),
                applied_bytes_received=state.get("bytes_received"),
            )
        if int(state.get("attempts", 0)) >= config.max_attempts:
            return finish(
                "gave-up",
                f"publication {publication} failed here {state.get('attempts')} times "
                f"({state.get('message', '?')}): waiting for a new publication",
                0,
            )
    if driving(config) and not config.force:
        return finish("waiting", "the car is driving (metrics driving=true): the next period will try", 0)
    wanted: dict[str, int] = channel["objects"]
    received = 0
    objects: dict[str, Path] = {}
    try:
        for digest, size in sorted(wanted.items()):
            objects[digest], got = ensure_object(config, digest, int(size))
            received += got
    except PullError as exc:
        return finish("refused", str(exc), 1, bytes_received=received)
    except (urllib.error.URLError, OSError) as exc:
        return finish("unreachable", f"download of publication {publication} broke off: {exc}", 0)
    status["bytes_received"] = received
    try:
        work = prepare_work(config, channel, objects)
    except (PullError, OSError, ValueError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        return finish("refused", f"publication {publication} cannot be unpacked: {exc}", 1)
    previous_attempts = int(state.get("attempts", 0)) if state.get("publication") == publication else 0
    attempts = previous_attempts + 1
    started = time.time()
    # The attempt is on disk (fsynced) before the deploy starts: a release that hangs or reboots the car
    # (a power cut, the watchdog) counts, so it is not tried again at every boot.
    write_json_atomic(
        state_path,
        {
            "publication": publication,
            "outcome": "applying",
            "attempts": attempts,
            "message": f"attempt {attempts} started at {now_iso()} and did not finish (the car restarted, "
            "or the agent was stopped)",
            "release": "",
            "bytes_received": received,
        },
    )
    result = apply(config, work)
    if result.status in {"locked", "skipped"}:
        # Another deploy holds the car, or the car started driving: not this publication's fault. The attempt
        # does not count; the next period tries again.
        write_json_atomic(state_path, state)  # as before this run
        return finish("waiting", f"{result.status}: {result.message}: the next period will try", 0)
    ok = result.status == "ok"
    line = result.message
    release = current_release(config.release_root) if ok else ""
    outcome = "applied" if ok else "failed"
    failed_gate = [] if ok else releases_failed_since(config.release_root, started)
    if failed_gate:
        # Never again: another try would drive the car on a release known to fail its gate. Only a failure
        # before the switch (a download, a full disk, a refused bundle) is tried again next period.
        attempts = max(attempts, config.max_attempts)
        line = (
            f"release {failed_gate[0]} failed its health gate on this car and it went back to its last good "
            f"release; waiting for a new publication ({line})"
        )
    write_json_atomic(
        state_path,
        {
            "publication": publication,
            "outcome": outcome,
            "attempts": attempts,
            "message": line,
            "release": release,
            "bytes_received": received,
        },
    )
    if ok:
        prune(config, set(wanted), publication)
    return finish(outcome, line, 0 if ok else 1, release=release, attempts=attempts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", type=Path, default=Path("/etc/rover/pull.json"))
    args = parser.parse_args(argv)
    config = PullConfig.load(args.config)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    with (config.state_dir / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another pull is running: nothing to do")
            return 0
        started = time.monotonic()
        code = run(config)
        log(f"done in {time.monotonic() - started:.1f} s")
        return code


if __name__ == "__main__":
    sys.exit(main())
