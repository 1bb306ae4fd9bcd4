"""Training progress for a person watching: a tqdm bar on a terminal, plain lines in a log file.

A bar redraws itself with carriage returns, which in a non-TTY log (a SLURM ``.out`` file, CI, ``| tee``) is one
endless line of redraws. So the bar is only used when stderr is a terminal; otherwise the main process prints
``qlora-dist: step 20/84 (24%) loss 1.234 lr 2.0e-04 4210 tok/s ETA 1m12s mem 1.2 GiB`` every
``train.progress_steps`` optimizer steps and at the last one.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


class Progress:
    """Progress of one launch's optimizer steps, on the main process only (``enabled``)."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int = 10, stream=None) -> None:
        self.total, self.initial, self.enabled, self.every = total, initial, enabled, max(1, every)
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if enabled and _is_tty(stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", file=stream)
        self._start = time.perf_counter()

    def update(self, step: int, row: dict[str, Any], memory_bytes: int | None = None) -> None:
        """Step ``step`` is done; ``row`` is its metrics row (loss, lr, tokens_per_s)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            self.bar.update(1)
        elif step % self.every == 0 or step >= self.total:
            log.info("%s", self.line(step, row, memory_bytes))

    def line(self, step: int, row: dict[str, Any], memory_bytes: int | None = None) -> str:
        """``step 20/84 (24%) loss 1.234 lr 2.0e-04 4210 tok/s ETA 1m12s mem 1.2 GiB``."""
        done = step - self.initial
        elapsed = time.perf_counter() - self._start
        eta = elapsed / done * (self.total - step) if done > 0 else None
        parts = [
            f"step {step}/{self.total} ({step / max(self.total, 1):.0%})",
            f"loss {row['loss']:.4f}",
            f"lr {row['lr']:.2e}",
            f"{row['tokens_per_s']:.0f} tok/s",
            f"ETA {format_seconds(eta)}" if eta is not None else "ETA ?",
        ]
        if memory_bytes:
            parts.append(f"mem {memory_bytes / 2**30:.2f} GiB")
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float) -> str:
    """``45s``, ``3m07s``, ``2h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
