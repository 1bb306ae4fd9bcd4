"""Real 2-process DeepSpeed ZeRO-2 / ZeRO-3 runs on CPU (gloo) with the project's own launch configs.

The same invariants as the DDP tests, measured the DeepSpeed way (collectives counted by wrapping DeepSpeed's
communication backend, checksums over the gathered base), plus the equivalence of single-process, DDP, ZeRO-2
and ZeRO-3 training, and the refusals of known-bad combinations.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qlora_dist import model as model_mod
from qlora_dist.config import ModelConfig, QuantConfig

from .conftest import LAUNCH_CONFIGS, REPO, free_port, launch, read_report, run_env, write_run_config

pytestmark = pytest.mark.distributed

EQUIV = {"max_steps": 3, "optimizer": "adamw", "grad_accum": 1, "max_grad_norm": 1.0}


def _run(tmp, name, launch_config, model_dir, data, cache_dir, num_processes=2, **sections):
    out = tmp / name
    cfg = write_run_config(tmp / f"{name}.yaml", model_dir, data, out, **sections)
    proc = launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir, launch_config, num_processes)
    return out, read_report(out), proc


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_llama_dir, small_alpaca, cache_dir):
    """One ZeRO-2 and one ZeRO-3 run (2 ranks, default paged 8-bit optimizer, merge on)."""
    tmp = tmp_path_factory.mktemp("zero")
    train = {"max_steps": 4, "grad_accum": 1}
    return {
        stage: _run(tmp, stage, f"deepspeed_{stage}.yaml", tiny_llama_dir, small_alpaca, cache_dir, train=train)
        for stage in ("zero2", "zero3")
    }


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_run_invariants(zero_runs, stage, tiny_llama_dir):
    out, report, proc = zero_runs[stage]
    assert report["world_size"] == 2 and report["distributed_type"] == "DEEPSPEED" and report["strategy"] == stage
    # The 4-bit share is measured on the loaded (under ZeRO-3: partitioned) base: still the whole decoder.
    assert report["quantized_fraction"] == 1.0 and report["quantization"]["qlora"] is True
    # bitsandbytes' paged 8-bit AdamW runs under both stages (the evidence for keeping it there).
    assert report["optimizer"] == "paged_adamw_8bit"
    # DeepSpeed reduces exactly the LoRA gradients (fp32 here), once per micro-step (grad_accum=1).
    assert report["grad_sync_bytes_per_step"] == report["trainable_grad_bytes"]
    step_s = report["train_seconds"] / report["steps"]
    assert all(0 < c < step_s for c in report["comm_seconds_per_step"]) and len(report["comm_seconds_per_step"]) == 2
    # Frozen base: the same bytes before and after, on every rank (over the gathered base under ZeRO-3).
    assert report["base_checksum_after"] == [report["base_checksum_before"]] * 2
    # Quantized once per machine under both stages: rank 1 loaded the packed base rank 0 wrote (ZeRO-3 too:
    # transformers 5.24 loads a 4-bit model whole on every rank, DeepSpeed partitions it afterwards).
    loads = report["base_load_per_rank"]
    assert loads[0]["source"] in ("built", "cache") and loads[1]["source"] == "cache" and loads[1]["reason"] is None
    assert len(set(report["lora_checksum_per_rank"])) == 1
    shards = report["data_shards"]
    assert shards["disjoint"] and min(shards["examples_per_rank"]) > 0  # token-balanced: counts may differ
    assert report["final_loss"] < report["initial_loss"]
    # The saved adapter is whole (never ZeRO-3's 0-sized placeholders) and loads with peft.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert report["merge"]["merged_by_rank"] == 0 and report["merge"]["rel_logit_error"] <= 1e-4
    assert proc.stderr.count("merged the adapter") + proc.stdout.count("merged the adapter") == 1

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    storage = report["quant_storage_dtype"]
    base = model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(tiny_llama_dir)),
        QuantConfig(storage_dtype=storage),
        torch.device("cpu"),
        torch.float32,
    )
    # Independent: a fresh NF4 load with the same storage dtype has the checksum the run reported.
    assert model_mod.base_checksum(base) == report["base_checksum_before"]
    qlora = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        ref, got = qlora(input_ids=ids).logits, merged(input_ids=ids).logits
    assert float((got - ref).norm() / ref.norm()) <= 1e-4


def test_zero3_shards_the_base_and_gathers_it(zero_runs):
    _, z2, _ = zero_runs["zero2"]
    _, z3, _ = zero_runs["zero3"]
    assert z2["quant_storage_dtype"] == "uint8" and z3["quant_storage_dtype"] == "float32"
    # ZeRO-2 keeps a whole replica per rank and gathers no base weights.
    assert z2["param_gather_bytes_per_step"] == 0
    # ZeRO-3: each rank holds half of the base (the packed 4-bit bytes are the same whether stored as uint8 or
    # float32; DeepSpeed pads partitions by a few elements), and the base moves every micro-step.
    full = z2["base_bytes_per_rank"][0]
    for held in z3["base_bytes_per_rank"]:
        assert abs(held - full / 2) <= 0.01 * full
    assert z3["param_gather_bytes_per_step"] > z3["base_bytes_per_rank"][0]


def test_single_ddp_zero2_zero3_reach_the_same_lora_weights(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    """Same seed, data and global batch (8): 1 process x 8, and 2 ranks x 4 under DDP, ZeRO-2 and ZeRO-3.

    The single process takes its loss from the model's full logits (``train.chunked_loss: false``), the others
    from the chunked loss (the head gathered for it under ZeRO-3): the chunked loss trains the same adapter.
    Every step's loss and the first step's gradient norm agree to 1e-6 relative. The weights get atol 1e-5:
    the chunked loss's backward multiplies only the labelled rows, so its gradients differ from the full
    path's in the last bits (~1e-7 relative), and AdamW's first step (update ~ lr * g / |g|) turns that into
    up to ~5e-6 on the odd weight whose gradient is nearly zero (measured: one element of 16384).

    fp32 on CPU. The runs differ only in the order of floating-point sums (one sum over 8 sequences vs two
    partial sums reduced by a collective; ZeRO reduces flattened buckets), ~1e-7 relative per step, so after
    3 AdamW steps the adapters agree to rtol 1e-4 / atol 1e-6. A sharding or normalisation mistake (an example
    seen twice, a loss averaged per rank instead of per token) moves them by ~1e-3 or more.
    """
    no_merge = {"merge": False}
    runs = {
        "single": _run(tmp_path, "single", "single_gpu.yaml", tiny_llama_dir, small_alpaca, cache_dir, 1,
                       train={**EQUIV, "micro_batch_size": 8, "chunked_loss": False}, output=no_merge),
        "ddp": _run(tmp_path, "ddp", "multi_gpu_ddp.yaml", tiny_llama_dir, small_alpaca, cache_dir,
                    train={**EQUIV, "micro_batch_size": 4}, output=no_merge),
        "zero2": _run(tmp_path, "zero2", "deepspeed_zero2.yaml", tiny_llama_dir, small_alpaca, cache_dir,
                      train={**EQUIV, "micro_batch_size": 4}, output=no_merge),
        "zero3": _run(tmp_path, "zero3", "deepspeed_zero3.yaml", tiny_llama_dir, small_alpaca, cache_dir,
                      train={**EQUIV, "micro_batch_size": 4}, output=no_merge),
    }  # fmt: skip
    worlds = {name: report["world_size"] for name, (_, report, _) in runs.items()}
    assert worlds == {"single": 1, "ddp": 2, "zero2": 2, "zero3": 2}
    adapters = {name: load_file(out / "adapter" / "adapter_model.safetensors") for name, (out, _, _) in runs.items()}
    reference = adapters.pop("single")
    assert max(float(t.abs().max()) for k, t in reference.items() if "lora_B" in k) > 1e-3  # it trained
    metrics = {name: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
               for name, (out, _, _) in runs.items()}  # fmt: skip
    for name, rows in metrics.items():
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in metrics["single"]], rel=1e-6), name
        assert rows[0]["grad_norm"] == pytest.approx(metrics["single"][0]["grad_norm"], rel=1e-6), name
    for name, adapter in adapters.items():
        assert adapter.keys() == reference.keys(), name
        for key in reference:
            assert torch.allclose(adapter[key], reference[key], rtol=1e-4, atol=1e-5), (name, key)


def test_zero3_offload_switches_optimizer_and_says_so(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    out, report, proc = _run(
        tmp_path, "offload", "deepspeed_zero3_offload.yaml", tiny_llama_dir, small_alpaca, cache_dir,
        train={"max_steps": 2}, output={"merge": False},
    )  # fmt: skip
    assert report["world_size"] == 2 and report["strategy"] == "zero3"
    assert report["optimizer"] == "deepspeed_cpu_adam"
    log = proc.stdout + proc.stderr
    assert (
        log.count("train.optimizer=paged_adamw_8bit cannot run under this launch (zero3): using deepspeed_cpu_adam")
        == 1
    )
    assert report["base_checksum_after"] == [report["base_checksum_before"]] * 2


def _refused(tmp_path, launch_config, model_dir, data, cache_dir, overrides):
    cfg = write_run_config(tmp_path / "run.yaml", model_dir, data, tmp_path / "out")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / launch_config)]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), "-m", "qlora_dist", "train", str(cfg)]
    proc = subprocess.run(
        cmd + overrides, capture_output=True, text=True, timeout=300, env=run_env(cache_dir), cwd=REPO
    )
    assert proc.returncode != 0
    # The workers print one short message each and no traceback (torchrun's own report of the failed
    # workers follows it; that one is the launcher's).
    assert "[rank0]: Traceback" not in proc.stderr and "qlora_dist/" not in proc.stderr
    assert not (tmp_path / "out").exists()
    return proc.stderr


def test_zero3_refuses_a_storage_dtype_it_cannot_partition(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    err = _refused(
        tmp_path, "deepspeed_zero3.yaml", tiny_llama_dir, small_alpaca, cache_dir, ["quant.storage_dtype=uint8"]
    )
    # Whichever rank reports first (the launcher then stops the other): one line, from the preflight on local
    # rank 0 ("launch: ...") or from the strategy check every rank runs.
    assert re.search(
        r"qlora-dist: error( \[rank 1\])?: (launch: )?quant.storage_dtype=uint8 cannot be partitioned", err
    )
    assert "set quant.storage_dtype=auto" in err


def test_strategy_that_contradicts_the_launch_is_refused(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    err = _refused(tmp_path, "deepspeed_zero2.yaml", tiny_llama_dir, small_alpaca, cache_dir, ["train.strategy=zero3"])
    assert "train.strategy=zero3 but the launch config gives zero2" in err
