"""Signals: what SIGTERM, SIGUSR1 and SIGINT mean at each phase of a run.

- **start-up** (config, lock, data, weights) and **the end** (final save, collective end of run): the process
  exits promptly (status 128 + signal). Nothing it wrote is half-done (every file of the project is written
  to a temporary name and renamed), and a launcher that stops the other ranks after one failed (torchrun
  sends SIGTERM, then SIGKILL 30 s later) is not kept waiting. No marker is left: the same SIGTERM is what
  torchrun sends when a peer failed, and ``PREEMPTED`` there would make a requeue script retry a failing run
  forever. The same command still resumes from the last checkpoint.
- **the training loop**: the signal only sets a flag; the loop all-reduces it with its loss (so every rank
  agrees at the same step), saves one checkpoint, leaves ``PREEMPTED`` and exits. Doing real work in a handler
  (saving in the middle of a backward, on one rank only) is how runs end up with torn checkpoints and hung
  collectives. A second signal while saving only sets the flag again.
- **the merge** (rank 0, alone, outside the process group): the signal is noted and the merge finishes; a
  launcher's grace period must allow for it (README, Checkpoints). SIGKILL then leaves only ``merged.tmp``,
  and the same command redoes the merge.

A prompt exit must work while the main thread is blocked inside a collective or a store wait (C++ code that
does not return to the interpreter, so a Python handler would never run): ``signal.set_wakeup_fd`` makes the
C-level handler write the signal number to a pipe at once, and a small thread reading it does the exit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

STARTUP, LOOP, MERGE, END = "start-up", "training", "merge", "end of the run"
FAILED = "failed"
"""The run is ending on an error it has already reported: a signal then exits at once, without a word."""
_PROMPT = (STARTUP, END, FAILED)

_current: StopSignal | None = None


class StopSignal:
    """The flag the handlers set, which signal set it, and the phase of the run that decides what it means."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase = STARTUP
        self._lock = threading.Lock()

    @classmethod
    def install(cls) -> StopSignal:
        """Install the handlers (main thread only; elsewhere the flag simply never gets set)."""
        global _current
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, stop._handle)
            read, write = os.pipe()
            os.set_blocking(write, False)
            signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            threading.Thread(target=stop._watch, args=(read,), name="qlora-dist-signals", daemon=True).start()
            _current = stop
        _die_with_launcher()
        return stop

    def enter(self, phase: str) -> None:
        """Switch what a signal means from now on (a signal already received during the loop stays noted)."""
        self.phase = phase

    def _watch(self, fd: int) -> None:
        """Runs in its own thread: acts on signals the main thread cannot (it may be blocked in C++)."""
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            for signum in data:  # every signal with a Python handler lands here: only ours count
                if signum in SIGNALS and self.phase in _PROMPT:
                    self._exit_now(signum)

    def _handle(self, signum, frame) -> None:
        if self.phase in _PROMPT:
            self._exit_now(signum)
            return  # the watcher thread is exiting already
        first = self.signum is None
        self.signum = signum
        if not first:
            return
        if self.phase == MERGE:
            log.warning("received %s during the merge: finishing it first", self.signal_name)
        else:
            log.warning("received %s: stopping at the end of this optimizer step with a checkpoint", self.signal_name)

    def _exit_now(self, signum: int) -> None:
        # Both the thread and the handler may get here for one signal: exit once.
        if not self._lock.acquire(blocking=False):
            return
        if self.phase != FAILED:
            name = signal.Signals(signum).name
            rank = os.environ.get("RANK", "0")
            where = "" if rank == "0" else f" [rank {rank}]"
            sys.stderr.write(f"qlora-dist{where}: received {name} during {self.phase}: exiting\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Run a block under phase ``name`` (e.g. the merge), then go back to the phase before it. A no-op where
    :meth:`StopSignal.install` was not called (a user's own script keeps its own signal handling)."""
    stop = _current
    if stop is None:
        yield
        return
    before = stop.phase
    stop.enter(name)
    try:
        yield
    finally:
        stop.enter(before)


def current() -> StopSignal | None:
    return _current


def failing() -> None:
    """The run is ending on an error already reported: from now on a signal (a launcher stopping the other
    ranks) exits at once and says nothing more."""
    if _current is not None:
        _current.enter(FAILED)


def _die_with_launcher() -> None:
    """Under a launcher, get SIGTERM when it dies (Linux): torchrun starts each worker in its own session, so
    a SIGKILL of the launcher's process group leaves the workers training on, unseen, racing a requeued job.
    With this they stop as if preempted (at a step boundary, with a checkpoint) or, before the loop, exit."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call: act on it now
        os.kill(os.getpid(), signal.SIGTERM)
