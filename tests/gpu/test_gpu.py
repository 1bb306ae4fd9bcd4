"""Checks that need CUDA: run on a lent GPU machine (``pytest tests/gpu``); skipped everywhere else.

- the memory planner's predicted peak against ``torch.cuda.max_memory_allocated`` of a real training step on an
  8B-shaped Llama built from a config with random weights (issue: within 15%);
- paged 8-bit AdamW really pages on CUDA (its state lives in CUDA managed memory) and trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory, tiny_tokenizer_dir):
    """An 8B-shaped Llama with random bf16 weights, saved once (about 16 GB on disk)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("llama8b")
    config = LlamaConfig(**LLAMA3_8B)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    for f in tiny_tokenizer_dir.iterdir():  # the tiny tokenizer: ids stay below the 128256 vocab
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_planned_peak_within_15_percent_of_measured(tmp_path, llama8b_dir, demo_data_dir):
    from qlora_dist.config import load_config
    from qlora_dist.plan import plan_memory

    overrides = [
        f"model.name_or_path={llama8b_dir}", f"data.path={demo_data_dir / 'alpaca_demo.jsonl'}", "data.max_length=512",
        "train.micro_batch_size=4", "train.max_steps=3", "train.save_steps=0", f"output.dir={tmp_path / 'out'}",
        "output.merge=false",
    ]  # fmt: skip
    config_path = tmp_path / "run.yaml"
    config_path.write_text("{}\n")
    plan = plan_memory(load_config(config_path, overrides), gpus=1, device="cuda")
    env = {**os.environ, "QLORA_DIST_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "0"}
    run = subprocess.run([sys.executable, "-m", "qlora_dist", "train", str(config_path), *overrides],
                         capture_output=True, text=True, timeout=1800, env=env, cwd=REPO)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    measured = report["peak_memory_bytes"][0]  # torch.cuda.max_memory_allocated on CUDA
    predicted = plan.peak_allocated_bytes
    print(
        f"predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB, ratio {predicted / measured:.3f}"
    )
    assert abs(predicted - measured) <= 0.15 * measured


def test_paged_adamw_8bit_pages_on_cuda():
    from benchmarks.gpu import paged_optimizer_check

    result = paged_optimizer_check()
    assert result["paged"], "the optimizer state is not a paged (managed-memory) tensor"
    assert result["outside_allocator"], f"PyTorch's allocator grew by {result['allocator_growth_bytes']} bytes"
    assert result["updated"]
