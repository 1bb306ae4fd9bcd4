"""Helpers for real multi-process runs: ``accelerate launch`` with the project's own launch configs, on CPU (gloo).

Each launch gets its own free port and a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH_CONFIGS = REPO / "launch_configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QLORA_DIST_CACHE=str(cache_dir), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("QLORA_DIST_DEBUG", None)
    return env


def launch(
    args: list[str],
    cache_dir: Path,
    launch_config: str = "multi_gpu_ddp.yaml",
    num_processes: int = 2,
    timeout: int = 420,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch_configs/<launch_config> ... <args>``; raises with the log tail on failure.

    ``env``: extra environment variables for the launch (e.g. a tracker's settings)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / launch_config)]
    cmd += ["--num_processes", str(num_processes), "--main_process_port", str(free_port()), *args]
    full_env = {**run_env(cache_dir), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(
            f"launch failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def write_run_config(path: Path, model_dir: Path, data_path: Path, out_dir: Path, **sections: dict) -> Path:
    """A small run config for the tiny test models: fp32 on CPU, no dropout, plain AdamW unless overridden."""
    config = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data_path), "format": "alpaca", "max_length": 64},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "lr": 3e-3, "seed": 7, "warmup_ratio": 0.0},
        "output": {"dir": str(out_dir)},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def read_report(out_dir: Path) -> dict:
    return json.loads((out_dir / "run_report.json").read_text())


@pytest.fixture(scope="session")
def small_alpaca(alpaca_rows) -> Path:
    """The first 64 rows of the demo alpaca set: an even count, so 2 ranks drop nothing."""
    return alpaca_rows(64)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qlora_cache")
