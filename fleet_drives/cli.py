"""The fleet's drives on the controller.

python -m fleet_drives verify EPISODE_DIR
    check an episode's files against its episode.json (sizes, sha256)
python -m fleet_drives receive --incoming DIR --car-store DIR --list FILE
    publish the episodes a collect run pulled into DIR (their names in FILE, one a line): each is checked
    against its episode.json and renamed into the car's store; a corrupt one is kept as `<name>.partial`;
    prints {"published": [...], "bytes": N, "errors": [...]}; exit 1 when an episode was not published
python -m fleet_drives merge --store DIR --output DATASET [--force]
    the collected episodes as one LeRobotDataset; prints a JSON summary (episodes, frames, steps left
    out, episodes skipped and why); exit 1 when an episode was skipped, 2 when nothing could be merged
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fleet_drives.merge import DEFAULT_TASK, MergeError, find_episodes, merge_episodes
from fleet_drives.receive import receive_episodes
from rover_runtime.episode_format import EpisodeError, open_episode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet_drives",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check a fetched episode against its checksums")
    verify.add_argument("episode", type=Path)
    receive = sub.add_parser("receive", help="verify and publish the episodes a collect run pulled")
    receive.add_argument("--incoming", type=Path, required=True, help="where the run put them")
    receive.add_argument("--car-store", type=Path, required=True, help="the car's store: <store>/<car>")
    receive.add_argument("--list", type=Path, required=True, help="the episodes' names, one a line")
    receive.add_argument(
        "--quota-bytes", type=int, help="the most the car's store may hold; an episode past it is not taken"
    )
    merge = sub.add_parser("merge", help="merge collected episodes into one LeRobotDataset")
    merge.add_argument(
        "--store", type=Path, required=True, help="the collect store: <store>/<car>/<episode>/"
    )
    merge.add_argument("--output", type=Path, required=True, help="the LeRobotDataset directory to write")
    merge.add_argument("--repo-id", default="rover/fleet_drives")
    merge.add_argument("--task", default=DEFAULT_TASK)
    merge.add_argument("--force", action="store_true", help="replace an existing output directory")
    report = sub.add_parser("report", help="the drive report: the drives against the training dataset")
    report.add_argument("--store", type=Path, required=True)
    report.add_argument("--training", type=Path, required=True, help="the training LeRobotDataset directory")
    report.add_argument("--output", type=Path, required=True, help="the report's directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "verify":
        return _verify(args.episode)
    if args.command == "receive":
        return _receive(args.incoming, args.car_store, args.list, args.quota_bytes)
    if args.command == "report":
        return _report(args.store, args.training, args.output)
    if not args.store.is_dir():
        print(f"error: no collect store at {args.store}", file=sys.stderr)
        return 2
    try:
        result = merge_episodes(
            find_episodes(args.store), args.output, repo_id=args.repo_id, task=args.task, force=args.force
        )
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(result.to_json(), sys.stdout, indent=2)
    print()
    return 1 if result.skipped else 0


def _verify(path: Path) -> int:
    try:
        episode = open_episode(path)
    except EpisodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"episode": str(path), "steps": episode.meta["steps"], "car": episode.meta["car"]}))
    return 0


def _receive(incoming: Path, car_store: Path, names: Path, quota_bytes: int | None) -> int:
    try:
        listed = [line.strip() for line in names.read_text().splitlines() if line.strip()]
    except OSError as exc:
        print(f"error: cannot read the list of episodes: {exc}", file=sys.stderr)
        return 2
    result = receive_episodes(incoming, car_store, listed, quota_bytes=quota_bytes)
    print(json.dumps(result.to_json()))
    return 1 if result.errors else 0


def _report(store: Path, training: Path, output: Path) -> int:
    from fleet_drives.report import write_report  # noqa: PLC0415 - matplotlib: only here
    from quantization.errors import QuantizationError  # noqa: PLC0415

    try:
        document = write_report(find_episodes(store), training, output)
    except QuantizationError as exc:
        print(f"error: the training dataset: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"report": str(output / "report.md"), "groups": len(document["groups"]),
                      "skipped": document["skipped"]}))  # fmt: skip
    return 0
