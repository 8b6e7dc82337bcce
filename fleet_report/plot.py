"""A PNG of the latency distribution per host (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fleet_report.files import save_figure
from fleet_report.results import HostResult


def plot_latency(results: list[HostResult], target: Path, limit_p95_ms: float | None = None) -> Path:
    """Box plot per host: from the latency samples when the car reported them, else from its percentiles
    (whiskers p50..max, box p50..p95, a mark at p99)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(results) + 2.0), 4.0), dpi=100)
    positions = list(range(1, len(results) + 1))
    for pos, result in zip(positions, results, strict=True):
        if result.latency_samples_ms:
            ax.boxplot([list(result.latency_samples_ms)], positions=[pos], widths=0.5, showfliers=True)
        else:
            stats = {
                "med": result.latency_p50_ms,
                "q1": result.latency_p50_ms,
                "q3": result.latency_p95_ms,
                "whislo": min(result.latency_p50_ms, result.latency_mean_ms),
                "whishi": result.latency_max_ms,
                "mean": result.latency_mean_ms,
                "fliers": [result.latency_p99_ms],
                "label": result.host,
            }
            ax.bxp([stats], positions=[pos], widths=0.5, showmeans=True, showfliers=True)
    if limit_p95_ms is not None:
        ax.axhline(
            limit_p95_ms, color="tab:red", linestyle="--", linewidth=1, label=f"p95 limit {limit_p95_ms:g} ms"
        )
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(positions, [f"{r.host}\n({r.architecture})" for r in results], fontsize=8)
    ax.set_ylabel("inference latency (ms)")
    ax.set_title("Policy latency per car (measured on each car)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, target)
