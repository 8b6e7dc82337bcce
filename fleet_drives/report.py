"""The drive report: how the fleet's drives compare with the training dataset, per car and per release.

For each (car, release) in the collect store: episodes, frames, time driven, the share of each mode, the
driver's takeovers (how many, how long), failsafe steps, and for every state and action dimension the
on-road mean, std, 5th and 95th percentiles beside the training dataset's, with the share of on-road values
outside the training range ([min, max]) and outside its 1-99 % band ([q01, q99]; about 2 % when the road
looks like the training data). A plot per action dimension overlays the on-road distributions on the
training one; another shows the inference latency and the SoC temperature over the drives. Written as
report.md, report.html, report.json, actions.png and timeline.png, from the store's files only.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet_report.files import save_figure
from quantization.dataset_split import read_dataset_info
from quantization.errors import QuantizationError
from rover_runtime.episode_format import Episode, EpisodeError, open_episode
from rover_runtime.metrics import write_bytes_atomic


@dataclass(frozen=True)
class Training:
    """What the report compares with: the training dataset's per-dimension values and statistics."""

    root: Path
    state_names: tuple[str, ...]
    action_names: tuple[str, ...]
    state: NDArray[np.float64]  # [frames, dims]
    action: NDArray[np.float64]
    stats: dict[str, dict[str, list[float]]]  # meta/stats.json: key -> min, max, q01, q99, ...


@dataclass
class Group:
    car: str
    release: str
    episodes: int = 0
    frames: int = 0
    seconds: float = 0.0
    modes: dict[str, int] = field(default_factory=dict)
    takeovers: list[float] = field(default_factory=list)  # seconds each
    fault_steps: int = 0
    state: list[list[float]] = field(default_factory=list)
    action: list[list[float]] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # unix time of each step with a reading below
    latency_ms: list[float | None] = field(default_factory=list)
    temp_c: list[float | None] = field(default_factory=list)


def load_training(root: Path) -> Training:
    """The training dataset's state and action columns and statistics, from its own files.

    The two columns are read from the dataset's parquet files with pyarrow (the LeRobotDataset format that
    lerobot 0.6.1 writes and reads): lerobot itself would import torch for them, 6 s of every collect.
    """
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # noqa: PLC0415 - controller only

    info = read_dataset_info(root)
    features = info.get("features")
    columns = ("observation.state", "action")
    missing = [c for c in columns if not isinstance(features, dict) or c not in features]
    files = sorted((root / "data").glob("chunk-*/file-*.parquet"))
    if missing or not files:
        what = f"no {' or '.join(missing)} feature" if missing else "no data/chunk-*/file-*.parquet"
        raise QuantizationError(f"{root}: {what}: not a training dataset the drives can be compared with")
    assert isinstance(features, dict)
    try:
        table = pq.ParquetDataset(files).read(columns=list(columns))
        stats = json.loads((root / "meta" / "stats.json").read_text())
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from both; JSON's from ValueError
        raise QuantizationError(f"{root}: unreadable data or statistics: {exc}") from None

    def values(name: str) -> NDArray[np.float64]:
        column = table.column(name).combine_chunks()
        return np.asarray(column.flatten().to_numpy(), np.float64).reshape(len(column), -1)

    return Training(
        root=root,
        state_names=tuple(features["observation.state"].get("names") or ()),
        action_names=tuple(features["action"].get("names") or ()),
        state=values("observation.state"),
        action=values("action"),
        stats=stats,
    )


def gather(episode_dirs: Sequence[Path]) -> tuple[list[Group], list[dict[str, str]]]:
    """Every readable episode's steps, grouped by (car, release); the unreadable ones with their error."""
    groups: dict[tuple[str, str], Group] = {}
    skipped: list[dict[str, str]] = []
    for path in episode_dirs:
        try:
            episode = open_episode(path)
            steps = episode.steps()
        except (EpisodeError, OSError, ValueError) as exc:
            skipped.append({"episode": str(path), "error": str(exc)})
            continue
        meta = episode.meta
        key = (str(meta["car"]), str(meta["release"]))
        group = groups.setdefault(key, Group(*key))
        _add(group, episode, steps)
    return sorted(groups.values(), key=lambda g: (g.car, g.release)), skipped


def _add(group: Group, episode: Episode, steps: list[dict[str, Any]]) -> None:
    meta = episode.meta
    fps = float(meta["fps"])
    group.episodes += 1
    group.frames += len(steps)
    group.seconds += len(steps) / fps
    for mode, count in meta.get("modes", {}).items():
        group.modes[mode] = group.modes.get(mode, 0) + int(count)
    group.takeovers += [(end - start) / fps for start, end in meta.get("takeovers", [])]
    group.fault_steps += int(meta.get("fault_steps", 0))
    for line in steps:
        if line["state"] is not None:
            group.state.append(line["state"])
        if line["applied"] is not None:
            group.action.append(line["applied"])
        group.wall.append(float(line["wall"]))
        group.latency_ms.append(line.get("latency_ms"))
        group.temp_c.append(line.get("temp_c"))


def compare(group: Group, training: Training) -> dict[str, Any]:
    """The group's summary and, per dimension, on-road vs training statistics."""
    seconds = max(group.seconds, 1e-9)
    takeovers = group.takeovers
    dims: list[dict[str, Any]] = []
    for kind, names, values, reference, key in (
        ("state", training.state_names, group.state, training.state, "observation.state"),
        ("action", training.action_names, group.action, training.action, "action"),
    ):
        road = np.asarray(values, np.float64).reshape(-1, len(names)) if values else np.empty((0, len(names)))
        stats = training.stats.get(key, {})
        for i, name in enumerate(names):
            column = road[:, i]
            low, high = stats.get("min", [np.nan] * len(names))[i], stats.get("max", [np.nan] * len(names))[i]
            q01, q99 = stats.get("q01", [low] * len(names))[i], stats.get("q99", [high] * len(names))[i]
            dims.append(
                {
                    "kind": kind,
                    "name": name,
                    "road": _summary(column),
                    "training": _summary(reference[:, i]),
                    "outside_range": _share(column, low, high),
                    "outside_q01_q99": _share(column, q01, q99),
                }
            )
    return {
        "car": group.car,
        "release": group.release,
        "episodes": group.episodes,
        "frames": group.frames,
        "minutes": round(group.seconds / 60, 2),
        "modes": {
            mode: round(count / max(group.frames, 1), 4) for mode, count in sorted(group.modes.items())
        },
        "takeovers": len(takeovers),
        "takeovers_per_hour": round(len(takeovers) / seconds * 3600, 1),
        "takeover_seconds_mean": round(float(np.mean(takeovers)), 2) if takeovers else None,
        "takeover_seconds_total": round(float(np.sum(takeovers)), 2),
        "fault_share": round(group.fault_steps / max(group.frames, 1), 4),
        "latency_ms": _percentiles([v for v in group.latency_ms if v is not None]),
        "temperature_c": _percentiles([v for v in group.temp_c if v is not None]),
        "dimensions": dims,
    }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    array = np.asarray(values, np.float64)
    return {
        "p50": round(float(np.percentile(array, 50)), 3),
        "p95": round(float(np.percentile(array, 95)), 3),
        "max": round(float(array.max()), 3),
    }


def _summary(column: NDArray[np.float64]) -> dict[str, float | None]:
    if not len(column):
        return {"mean": None, "std": None, "p05": None, "p95": None}
    return {
        "mean": round(float(column.mean()), 4),
        "std": round(float(column.std()), 4),
        "p05": round(float(np.percentile(column, 5)), 4),
        "p95": round(float(np.percentile(column, 95)), 4),
    }


def _share(column: NDArray[np.float64], low: float, high: float) -> float | None:
    if not len(column) or np.isnan(low) or np.isnan(high):
        return None
    return round(float(np.mean((column < low) | (column > high))), 4)


def write_report(episode_dirs: Sequence[Path], training_root: Path, output: Path) -> dict[str, Any]:
    training = load_training(training_root)
    groups, skipped = gather(episode_dirs)
    rows = [compare(g, training) for g in groups]
    document = {"training": str(training_root), "groups": rows, "skipped": skipped}
    output.mkdir(parents=True, exist_ok=True)
    _plot_actions(groups, training, output / "actions.png")
    _plot_timeline(groups, output / "timeline.png")
    write_bytes_atomic(output / "report.json", (json.dumps(document, indent=2) + "\n").encode())
    write_bytes_atomic(output / "report.md", to_markdown(document).encode())
    write_bytes_atomic(output / "report.html", to_html(document).encode())
    return document


def _table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["car", "release", "episodes", "minutes", "autopilot", "manual", "takeovers", "takeover s (mean)",
            "takeovers/h", "failsafe", "latency p50/p95 (ms)", "temperature max (°C)"]  # fmt: skip
    rows = []
    for g in document["groups"]:
        auto = sum(v for k, v in g["modes"].items() if k.startswith("autopilot") or k == "pi_only")
        rows.append([
            g["car"], g["release"], str(g["episodes"]), f"{g['minutes']:.1f}", f"{auto:.0%}",
            f"{g['modes'].get('manual', 0):.0%}", str(g["takeovers"]),
            "-" if g["takeover_seconds_mean"] is None else f"{g['takeover_seconds_mean']:.1f}",
            f"{g['takeovers_per_hour']:.1f}", f"{g['fault_share']:.1%}", _latency(g["latency_ms"]),
            "-" if g["temperature_c"]["max"] is None else f"{g['temperature_c']['max']:.1f}",
        ])  # fmt: skip
    return head, rows


def _dim_rows(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["car", "release", "value", "road mean ± std", "training mean ± std", "road p05..p95",
            "training p05..p95", "outside training range", "outside training q01..q99"]  # fmt: skip
    rows = []
    for g in document["groups"]:
        for d in g["dimensions"]:
            road, train = d["road"], d["training"]
            rows.append([
                g["car"], g["release"], f"{d['kind']} {d['name']}", _pm(road), _pm(train), _band(road),
                _band(train), _pct(d["outside_range"]), _pct(d["outside_q01_q99"]),
            ])  # fmt: skip
    return head, rows


def _latency(s: dict[str, float | None]) -> str:
    return "-" if s["p50"] is None else f"{s['p50']:.1f}/{s['p95']:.1f}"


def _pm(s: dict[str, float | None]) -> str:
    return "-" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


def _band(s: dict[str, float | None]) -> str:
    return "-" if s["p05"] is None else f"{s['p05']:.3f}..{s['p95']:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def to_markdown(document: dict[str, Any]) -> str:
    out = ["# Drive report", "", f"Training dataset: `{document['training']}`.", ""]
    for head, rows in (_table(document), _dim_rows(document)):
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    if document["skipped"]:
        out += ["## Episodes left out", ""] + [f"- {s['error']}" for s in document["skipped"]] + [""]
    out += ["## Actions on the road and in training", "", "![actions](actions.png)", ""]
    out += ["## Latency and temperature over the drives", "", "![timeline](timeline.png)", ""]
    return "\n".join(out)


def to_html(document: dict[str, Any]) -> str:
    e = html.escape
    tables = ""
    for head, rows in (_table(document), _dim_rows(document)):
        tables += "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
        tables += (
            "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
        )
    skipped = "".join(f"<li>{e(s['error'])}</li>" for s in document["skipped"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Drive report</title><style>'
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Drive report</h1><p>Training dataset: <code>{e(document['training'])}</code>.</p>{tables}"
        + (f"<h2>Episodes left out</h2><ul>{skipped}</ul>" if skipped else "")
        + '<h2>Actions on the road and in training</h2><img src="actions.png" alt="actions">'
        + '<h2>Latency and temperature over the drives</h2><img src="timeline.png" alt="timeline">'
        + "</body></html>\n"
    )


def _plot_actions(groups: Sequence[Group], training: Training, target: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = training.action_names
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), dpi=100, squeeze=False)
    for i, (name, ax) in enumerate(zip(names, axes[0], strict=True)):
        ax.hist(training.action[:, i], bins=40, density=True, alpha=0.4, color="gray", label="training")
        by_label: dict[str, list[float]] = defaultdict(list)
        for g in groups:
            by_label[f"{g.car} {g.release[:20]}"] += [a[i] for a in g.action]
        for label, values in by_label.items():
            if values:
                ax.hist(values, bins=40, density=True, histtype="step", linewidth=1.5, label=label)
        ax.set_title(f"action: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, target)


def _plot_timeline(groups: Sequence[Group], target: Path) -> None:
    """Inference latency and SoC temperature against the time of day, one line per car and release."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    start = min((min(g.wall) for g in groups if g.wall), default=0.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), dpi=100, sharex=True)
    for g in groups:
        label = f"{g.car} {g.release[:20]}"
        for ax, values in ((top, g.latency_ms), (bottom, g.temp_c)):
            points = [((w - start) / 60, v) for w, v in zip(g.wall, values, strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), ".", markersize=2, label=label)
    top.set_ylabel("inference (ms)")
    bottom.set_ylabel("SoC temperature (°C)")
    bottom.set_xlabel("minutes since the first recorded step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    save_figure(fig, target)
