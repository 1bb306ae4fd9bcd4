"""What every benchmark harness shares: the machine and library line, replacing one section of BENCHMARKS.md,
and the environment child processes run in (this folder importable, nothing online)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def machine() -> str:
    """CPU model, cores, memory and library versions, in one line."""
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, accelerate {accelerate.__version__}"
    )


def write_section(path: Path, section: str) -> None:
    """Replace (or add) the section of ``path`` whose title is ``section``'s first line, leaving every other
    section alone."""
    title = section.splitlines()[0].strip()
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "\n".join(lines[end:])
        new = "\n".join(lines[:start]) + "\n" + section.rstrip("\n") + "\n" + ("\n" + tail + "\n" if tail else "")
    path.write_text(new, encoding="utf-8")


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the repository on ``PYTHONPATH`` (children run ``python -m benchmarks.*``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
