"""Measured facts of a run: ``metrics.jsonl`` (one line per logged step), ``run_report.json`` and ``loss.png``.

Only the main process writes. Files are written to a temporary name and renamed, so a reader never sees a
half-written report.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fsutil import disk_errors, is_disk_full

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; a no-op on non-main processes."""

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0) -> None:
        """A fresh log, or (``resume_step`` > 0) the existing one cut back to the rows up to that step: the
        steps after the checkpoint are done again and logged again."""
        self.path = path
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.sink: Callable[[dict[str, Any]], None] | None = None
        """Also called with every row written (the experiment trackers)."""
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step and path.is_file():
                old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                self.rows = [r for r in old if r.get("step", 0) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.enabled:
            with disk_errors("metrics", self.path), self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.sink is not None:
            self.sink(row)


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: ``/proc``), or None where that is not known. Measured from
    the process's own start, so interpreter start-up and imports count as well."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (a reader sees old or new, whole)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_loss(rows: list[dict[str, Any]], path: Path) -> bool:
    """Plot training (and eval) loss against the optimizer step; returns False when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in train], [v for _, v in train], label="train loss")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if not is_disk_full(e):
            raise
        # A picture of metrics.jsonl is not worth failing a run for; a full disk then fails the adapter save
        # right after, with its own one-line error.
        log.warning("could not write %s (disk full): the numbers are in metrics.jsonl", path)
        tmp.unlink(missing_ok=True)
        return False
    finally:
        plt.close(fig)
    return True
