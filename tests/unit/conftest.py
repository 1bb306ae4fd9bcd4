"""Fixtures the unit tests of several modules share: the one real run of the benchmark harnesses' smoke shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class TinyGpuCheck:
    """``python -m benchmarks.gpu --tiny``, run once: its process, ``--json`` results and ``--markdown`` section."""

    proc: subprocess.CompletedProcess
    result: dict[str, Any]
    markdown: str


@pytest.fixture(scope="session")
def tiny_gpu_check(tmp_path_factory) -> TinyGpuCheck:
    """One real run of the GPU check on its tiny shape (the throughput benchmark's ``QUICK`` setup, on the CPU).

    Its ``bench`` part is :func:`benchmarks.throughput.run_bench` on exactly the setup ``--quick`` runs, so the
    throughput tests read their end-to-end facts from this run instead of training the three recipes again."""
    work = tmp_path_factory.mktemp("bench_gpu_tiny")
    markdown, results = work / "BENCH.md", work / "results.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    args = ["--tiny", "--work", str(work / "work"), "--markdown", str(markdown), "--json", str(results)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", *args],
        capture_output=True, text=True, timeout=420, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return TinyGpuCheck(proc, json.loads(results.read_text()), markdown.read_text())
