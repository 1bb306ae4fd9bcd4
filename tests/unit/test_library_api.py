"""The library face without the ready loop: a user's own ``Accelerator()`` and ``accelerator.prepare``.

``load_model`` needs no ``make_accelerator`` first; the comm counters say ``null`` (not measured) instead of 0
when ``plugin.prepare`` was bypassed; the schedule follows ``train.lr_scheduler``/``warmup_ratio``; library use
gets the ``qlora-dist:`` log lines and none of the libraries' warnings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
from accelerate import Accelerator
from qlora_dist import QLoRAPlugin

plugin = QLoRAPlugin.from_yaml(sys.argv[1])
accelerator = Accelerator(cpu=True)  # the user's own, not plugin.make_accelerator()
tokenizer = plugin.load_tokenizer()
train_data, _ = plugin.load_data(accelerator, tokenizer)
model, tokenizer = plugin.load_model(accelerator, tokenizer)
optimizer = plugin.make_optimizer(model)
scheduler = plugin.make_scheduler(optimizer, total_steps=4)
model, optimizer = accelerator.prepare(model, optimizer)  # bypasses plugin.prepare: nothing counts the comm
lrs, losses = [], []
for _, micro_batches in zip(range(2), plugin.epoch_steps(train_data, 0, 0, 1, tokenizer.pad_token_id)):
    loss, tokens = plugin.train_step(accelerator, model, micro_batches)
    plugin.strategy.step(accelerator, model, optimizer, 1.0)
    scheduler.step()
    lrs.append(scheduler.get_last_lr()[0])
    losses.append(loss)
report = plugin.finish(accelerator, model, tokenizer, stats={"steps": 2})
keys = ("grad_sync_bytes_per_step", "param_gather_bytes_per_step", "comm_seconds_per_step", "strategy", "world_size")
print(json.dumps({"report": {k: report[k] for k in keys}, "lrs": lrs, "losses": losses}))
"""


def test_own_accelerator_and_prepare(tmp_path, tiny_llama_dir, demo_data_dir):
    cfg = {
        "model": {"name_or_path": str(tiny_llama_dir)},
        "data": {"path": str(demo_data_dir / "alpaca_demo.jsonl"), "max_length": 48},
        "train": {
            "micro_batch_size": 2,
            "lr": 1e-3,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.5,
            "optimizer": "adamw",
        },
        "output": {"dir": str(tmp_path / "out"), "merge": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "QLORA_DIST_CACHE": str(tmp_path / "cache")}
    env.pop("QLORA_DIST_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report = result["report"]
    assert report["world_size"] == 1 and report["strategy"] == "single"
    # Not measured, so null; a 0 would read as "this run synchronised nothing".
    assert report["grad_sync_bytes_per_step"] is None and report["param_gather_bytes_per_step"] is None
    assert report["comm_seconds_per_step"] == [None]
    # Linear warmup over half of 4 steps, to the peak at step 2: the config's schedule, not a default.
    assert result["lrs"] == [5e-4, 1e-3]
    assert all(0 < loss < 20 for loss in result["losses"])
    assert "qlora-dist: data:" in proc.stderr  # library use logs like the command line
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
