"""Preemption: SIGTERM, SIGUSR1 or SIGINT only set a flag; the loop acts on it at the next step boundary.

Doing real work in a signal handler (saving in the middle of a backward, on one rank only) is how runs end
up with torn checkpoints and hung collectives. Here the handler records the signal and returns; the loop
all-reduces the flag with its loss (so every rank agrees at the same step), saves one checkpoint and exits.
A second signal while saving only sets the flag again.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignal:
    """The flag the handlers set, and which signal set it."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @classmethod
    def install(cls) -> StopSignal:
        """Install the handlers (main thread only; elsewhere the flag simply never gets set)."""
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, stop._handle)
        return stop

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            log.warning("received %s: stopping at the end of this optimizer step with a checkpoint", self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name
