"""One run per output folder: an exclusive OS lock on ``output.dir/.qlora-dist.lock``, held by rank 0.

The lock is ``flock(2)`` on an open file: the kernel drops it when the process ends, however it ends (a
crash, SIGKILL, the node rebooting a local disk), so it can never be left stale and never needs cleaning
up. The file itself stays; it holds the host, pid and start time of the last holder, which is what the
refusal of a second run names. Rank 0 takes it before it writes anything into the folder and keeps it until
the process exits (training, the final save, the merge). Under several nodes it is taken where rank 0
writes, which is where every checkpoint is renamed into place.

``flock`` locks are local to one host on some network filesystems (older NFS clients emulate them with
POSIX locks, which do work across hosts; Lustre needs its ``flock`` mount option): two runs started on two
different machines into one shared folder are only refused where the filesystem supports it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".qlora-dist.lock"

_held: dict[Path, OutputLock] = {}
"""Locks this process holds, by folder: ``qlora-dist train`` takes it first thing, the plugin then finds it."""


class OutputLock:
    """The held lock: keep the object (its open file is the lock) for as long as the run writes."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Drop the lock now (it is dropped at process exit anyway)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            _held.pop(self.path.parent.resolve(), None)


def check_not_finished(output_dir: Path, overwrite: bool) -> None:
    """Refuse an ``output.dir`` that already holds a finished run (its ``run_report.json``) unless ``overwrite``."""
    if not overwrite and (Path(output_dir) / "run_report.json").exists():
        raise UserError(
            f"output.dir={output_dir} already holds a finished run; "
            "choose another output.dir or set output.overwrite=true"
        )


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``output.dir`` that is a file, or that cannot be created or written, before anything loads."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir={out} is a file, not a folder: choose another output.dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output.dir={out} cannot be created ({_reason(e)}): choose a writable output.dir") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output.dir={out} is not writable by this user: choose a writable output.dir") from None


def acquire(output_dir: Path) -> OutputLock:
    """Take the folder's lock without waiting (or return it, when this process holds it already), or raise a
    UserError naming the run that holds it."""
    out = Path(output_dir)
    key = out.resolve()
    if key in _held:
        return _held[key]
    check_output_dir(out)
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(
            f"output.dir={out}: cannot create {LOCK_FILE} ({_reason(e)}): choose a writable output.dir"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"output.dir={out}: cannot lock {path} ({_reason(e)})") from None
        raise UserError(
            f"output.dir={out} is in use by another run ({holder}): wait for it to end, or choose another "
            "output.dir (one run per output folder)"
        ) from None
    # Ours now: say who holds it, for the next run that is refused.
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = OutputLock(path, fd)
    return _held[key]


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown: it is still starting"


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
