"""What a data path must be before anything reads it: an existing folder, or a file with something in it.

Kept apart from ``data.py`` (which imports ``datasets``) so that ``train`` and ``check`` can refuse a missing
or empty data file before any heavy library is imported.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError


def check_path(p: Path) -> None:
    """Raise :class:`DataError` for a data path that does not exist or is an empty file."""
    if p.is_file() and p.stat().st_size < (1 << 20) and not p.read_bytes().strip():
        raise DataError(f"{p}: has no rows (the file is empty)")
    if not p.exists():
        raise DataError(
            f"data file not found: {p.resolve()} (data.path={str(p)!r}); "
            "give a .jsonl/.json/.csv/.parquet file or a folder written by datasets' save_to_disk"
        )
