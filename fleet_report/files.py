"""Report figures written whole: a reader sees the old file or the new one, never a part (text and JSON:
rover_runtime.metrics.write_bytes_atomic, the project's one atomic writer)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def save_figure(fig: Any, target: Path) -> Path:
    """Save a matplotlib figure as PNG at `target` (atomically) and close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        Path(tmp).chmod(0o644)
        Path(tmp).replace(target)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return target
