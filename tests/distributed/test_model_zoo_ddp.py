"""A non-Llama family under real 2-process DDP: GPT-2, whose Conv1D weights are stored (in, out) while its 4-bit
layers and LoRA deltas are (out, in). The run must be QLoRA (measured), keep the base frozen and the adapter equal
on both ranks, and merge into a plain GPT-2 that reproduces NF4 base + adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qlora_dist.config import ModelConfig, QuantConfig
from qlora_dist.model import load_quantized_model

from .conftest import launch, read_report, write_run_config

pytestmark = pytest.mark.distributed


def test_gpt2_trains_as_qlora_on_two_ranks_and_merges_verified(tmp_path, tiny_gpt2_dir, small_alpaca, cache_dir):
    out = tmp_path / "out"
    cfg = write_run_config(tmp_path / "run.yaml", tiny_gpt2_dir, small_alpaca, out, train={"max_steps": 4})
    launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    report = read_report(out)
    assert report["world_size"] == 2 and report["distributed_type"] == "MULTI_CPU"
    assert report["quantized_fraction"] == 1.0 and report["quantization"]["qlora"] is True
    assert report["base_checksum_after"] == [report["base_checksum_before"]] * 2
    assert len(set(report["lora_checksum_per_rank"])) == 1
    assert report["merge"]["verified"] is True and report["merge"]["rel_logit_error"] <= 1e-4

    base = load_quantized_model(
        ModelConfig(name_or_path=str(tiny_gpt2_dir)), QuantConfig(), torch.device("cpu"), torch.float32
    )
    qlora = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference, got = qlora(input_ids=ids).logits, merged(input_ids=ids).logits
    assert float((got - reference).norm() / reference.norm()) <= 1e-4
