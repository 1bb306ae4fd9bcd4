"""Durable writes: fsync a file or a folder (a rename is only durable once its folder is synced), replace a
folder whole, and turn a full disk into one line that says what was being written."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# How a full disk (or quota) shows up: OSError from Python, or the message of torch's and safetensors' writers.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_WORDS = ("no space left", "file write failed", "storagefull", "quota exceeded", "disk quota")


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``final`` (old one removed only once the new one is in)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    text = str(error).lower()
    return any(w in text for w in _FULL_WORDS) or "os error 28" in text or "code: 28" in text


@contextmanager
def disk_errors(what: str, where: Path) -> Iterator[None]:
    """Inside, a full disk (or quota, or a read-only filesystem) raises one UserError naming ``what`` and
    ``where``; every other error passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise UserError(
                f"no space left on the device writing {what} to {where}: free some space (`qlora-dist check` "
                "estimates what a run needs) and run the same command again; it resumes from the last complete "
                "checkpoint"
            ) from None
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES):
            raise UserError(f"cannot write {what} to {where} ({e.strerror}): choose a writable output.dir") from None
        raise
