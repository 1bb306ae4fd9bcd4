"""The GPU check (``benchmarks.gpu``) runs end to end on a tiny shape on the CPU, so that the day a GPU
is lent it works the first time. Only the harness is tested here: what it measures needs the GPU. The run itself
is the ``tiny_gpu_check`` fixture (tests/unit/conftest.py), which test_bench.py reads too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import throughput as bench

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )  # fmt: skip


def test_tiny_gpu_check_produces_every_part(tiny_gpu_check):
    result = tiny_gpu_check.result
    assert result["errors"] == {}
    assert set(result["bench"]["summary"]) == set(bench.RECIPES)
    assert all(0 < v < 1 for v in result["mfu"].values()), result["mfu"]  # a fraction of the measured rate
    assert result["matmul"]["flops_per_s"] > 0
    planner = result["planner"]
    assert set(planner["rows"]) == {"qlora_dist", "qlora_dist_packed"}
    assert all(r["planned_bytes"] > 0 and r["measured_bytes"] > 0 for r in planner["rows"].values())
    assert planner["comparable"] is torch.cuda.is_available()
    assert result["paged_optimizer"]["ran"] is torch.cuda.is_available()

    text = tiny_gpu_check.markdown
    assert text.count("## GPU check") == 1
    for recipe in bench.RECIPES:
        assert f"| {bench.LABELS[recipe]} |" in text
    assert "Model FLOPs utilisation" in text and "planned peak_allocated" in text and "Paged AdamW 8-bit" in text
    assert "failed" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_full_size_check_refuses_without_a_gpu(tmp_path):
    proc = _run("--work", str(tmp_path))
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing is built before the refusal"
