"""Real 2-process DDP runs on CPU (gloo) through ``accelerate launch --config_file launch_configs/multi_gpu_ddp.yaml``.

Every test asserts the world size the workers actually saw: a misconfigured launch runs N independent
single-process jobs and would pass most other checks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from qlora_dist import model as model_mod
from qlora_dist.config import ModelConfig, QuantConfig
from qlora_dist.data import rank_indices

from .conftest import REPO, launch, read_report, write_run_config

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_llama_dir, small_alpaca, cache_dir):
    """One 2-rank run with gradient accumulation, eval and the rank-0 merge; shared by the checks below."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "out"
    cfg = write_run_config(
        tmp / "run.yaml",
        tiny_llama_dir,
        small_alpaca,
        out,
        data={"eval_fraction": 0.125},
        train={"epochs": 4, "grad_accum": 2, "eval_steps": 3, "optimizer": "paged_adamw_8bit"},
    )
    proc = launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    return out, read_report(out), proc


def test_workers_formed_one_two_rank_group(ddp_run):
    _, report, _ = ddp_run
    assert report["world_size"] == 2
    assert report["distributed_type"] == "MULTI_CPU"
    assert len(report["lora_checksum_per_rank"]) == 2 and len(report["peak_memory_bytes"]) == 2
    # Start-up is measured from rank 0's process start: it holds the base load (and the imports before it).
    assert report["startup_seconds"] > report["base_load_per_rank"][0]["seconds"] > 0


def test_only_lora_gradients_are_synchronised(ddp_run):
    _, report, _ = ddp_run
    # Counted by the DDP communication hook, per optimizer step (accumulation micro-steps sync nothing).
    assert report["grad_sync_bytes_per_step"] == report["trainable_grad_bytes"]
    assert report["trainable_grad_bytes"] * 4 < report["full_grad_bytes"]
    # Each rank timed its all-reduces: some time, and less than the whole step they happened in.
    step_s = report["train_seconds"] / report["steps"]
    assert len(report["comm_seconds_per_step"]) == 2
    assert all(0 < c < step_s for c in report["comm_seconds_per_step"])


def test_frozen_base_unchanged_and_identical_on_every_rank(ddp_run, tiny_llama_dir):
    _, report, _ = ddp_run
    assert report["base_checksum_after"] == [report["base_checksum_before"]] * 2
    # Independent: quantize the base afresh in this process; NF4 quantization is deterministic.
    fresh = model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(), torch.device("cpu"), torch.float32
    )
    assert model_mod.base_checksum(fresh) == report["base_checksum_before"]
    # Quantized once on this machine: rank 1 loaded the packed NF4 base rank 0 wrote (this run or an earlier
    # one of the session), and still has the checksum of the base quantized afresh.
    loads = report["base_load_per_rank"]
    assert loads[0]["source"] in ("built", "cache") and loads[1]["source"] == "cache"
    assert loads[0]["cache_dir"] == loads[1]["cache_dir"] and loads[1]["file_bytes"] > 0


def test_lora_identical_on_every_rank_and_saved_adapter_matches(ddp_run):
    out, report, _ = ddp_run
    assert len(set(report["lora_checksum_per_rank"])) == 1
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained


def test_shards_disjoint_and_covering(ddp_run, small_alpaca):
    _, report, _ = ddp_run
    shards = report["data_shards"]
    n_train = report["num_examples"]
    assert n_train == 56  # 64 rows, 1/8 held out for eval
    assert shards["disjoint"] is True
    # Token-balanced (the default): every example on exactly one rank, the counts per rank free.
    assert sum(shards["examples_per_rank"]) == shards["covered"] == n_train == shards["total"]
    assert min(shards["examples_per_rank"]) > 0
    # The count split, as a pure function, covers the same way.
    ranks = [set(rank_indices(n_train, 7, 0, r, 2)) for r in range(2)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == n_train


def test_loss_falls_and_eval_ran(ddp_run):
    out, report, _ = ddp_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    steps = 4 * math.ceil(math.ceil(28 / 4) / 2)
    assert report["steps"] == steps == len(losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert report["final_loss"] < report["initial_loss"]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 9, 12, 15, steps]
    assert report["eval_loss"] is not None and math.isfinite(report["eval_loss"])
    assert (out / "loss.png").stat().st_size > 0
    assert report["tokens_per_s"] > 0 and report["train_seconds"] > 0


def test_rank0_merge_reproduces_base_nf4_plus_adapter(ddp_run, tiny_llama_dir, small_alpaca):
    out, report, proc = ddp_run
    merge = report["merge"]
    assert merge["merged_by_rank"] == 0 and merge["base"] == "dequantized" and merge["dtype"] == "float32"
    assert merge["rel_logit_error"] <= 1e-4
    assert (out / "merged").is_dir() and not (out / "merged.tmp").exists()
    assert not list((out / "merged").glob("*.bin")) and list((out / "merged").glob("*.safetensors"))
    assert proc.stderr.count("merged the adapter") + proc.stdout.count("merged the adapter") == 1

    # Independent check: plain transformers on the merged folder against a fresh NF4 base + the saved adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(), torch.device("cpu"), torch.float32
    )
    qlora = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = tok(["Add 2 and 3.", "What is the capital of France? The capital"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = qlora(**ids).logits
        got = merged(**ids).logits
    assert float((got - ref).norm() / ref.norm()) <= 1e-4


def test_resolved_config_written(ddp_run):
    out, _, _ = ddp_run
    from qlora_dist.config import load_config

    cfg = load_config(out / "config.yaml")
    assert cfg.train.grad_accum == 2 and cfg.quant.compute_dtype == "auto"


@pytest.mark.parametrize("packing", [False, True, "skewed"], ids=["padded", "packed", "finer-split"])
def test_two_ranks_equal_one_rank_with_double_batch(tmp_path, tiny_llama_dir, small_alpaca, cache_dir, packing):
    """2 ranks x micro-batch b and 1 rank x 2b (under launch_configs/single_gpu.yaml) see the same examples per
    step and reach the same LoRA weights.

    Tolerance: fp32 on CPU, the only difference is the order of floating-point sums (DDP's all-reduce of two
    partial gradients vs one sum over the whole batch), which moves weights by ~1e-7 relative per step.
    Packed: rows of up to 128 tokens holding several examples, through the per-example attention; there the one
    rank takes its loss from the model's full logits (``train.chunked_loss: false``), the two ranks from the
    chunked loss.
    Finer split: examples of 60-1,024 tokens (the bench data) and grad_accum 1, where the token-balanced split
    gives each of the 2 ranks two micro-batches of one row instead of one of two (data.balance_tokens).
    """
    common = {"max_steps": 4, "optimizer": "adamw", "grad_accum": 2, "max_grad_norm": 1.0}
    data = {"packing": True, "max_length": 128} if packing is True else {}
    skewed = packing == "skewed"
    if skewed:
        rows = (REPO / "examples" / "data" / "bench" / "alpaca_varlen.jsonl").read_text().splitlines()[:64]
        small_alpaca = tmp_path / "varlen.jsonl"
        small_alpaca.write_text("\n".join(rows) + "\n")
        common["grad_accum"], data, packing = 1, {"max_length": 1024}, False
    if packing:  # the packed rows end in a part-step (1 rank trains it, 2 drop it): stay before it
        common["max_steps"] = 3
    out1, out2 = tmp_path / "one", tmp_path / "two"
    cfg1 = write_run_config(
        tmp_path / "one.yaml",
        tiny_llama_dir,
        small_alpaca,
        out1,
        train={**common, "micro_batch_size": 4, "chunked_loss": not packing},
        data=data,
        output={"merge": False},
    )
    cfg2 = write_run_config(
        tmp_path / "two.yaml",
        tiny_llama_dir,
        small_alpaca,
        out2,
        train={**common, "micro_batch_size": 2},
        data=data,
        output={"merge": False},
    )
    launch(["-m", "qlora_dist", "train", str(cfg1)], cache_dir, launch_config="single_gpu.yaml", num_processes=1)
    launch(["-m", "qlora_dist", "train", str(cfg2)], cache_dir)
    r1, r2 = read_report(out1), read_report(out2)
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    # launch_configs/single_gpu.yaml: one process, nothing to synchronise (the single-process merge is checked
    # by tests/unit/test_cli_errors.py's end-to-end run and the model zoo's).
    assert r1["distributed_type"] == "NO" and r1["steps"] == common["max_steps"]
    assert r1["grad_sync_bytes_per_step"] == 0 and r1["comm_seconds_per_step"] == [0.0]
    assert r2["loss"] == "chunked"
    # The token split may run up to twice grad_accum (smaller) micro-batches on each of the 2 ranks; 1 rank keeps
    # its grad_accum (nobody to wait for). Either way the step's gradient is the same.
    assert r1["micro_batches_per_step"] == common["grad_accum"]
    assert common["grad_accum"] <= r2["micro_batches_per_step"] <= 2 * common["grad_accum"]
    if skewed:  # the finer split really ran, in most steps
        assert r2["micro_batches_per_step"] > 1.5, r2["micro_batches_per_step"]
    assert r2["balance_cost"]["labelled"] > 0 and r2["balance_cost"]["overhead"] > 0  # the model's own costs
    print("micro-batches per step, 2 ranks:", r2["micro_batches_per_step"])
    assert r1["loss"] == ("full logits: train.chunked_loss is false" if packing else "chunked")
    if packing:  # several examples per row, so the per-example attention path really ran
        assert r1["num_examples"] == r2["num_examples"] < 64 // 2
    assert r1["initial_loss"] == pytest.approx(r2["initial_loss"], rel=1e-6)
    a1 = load_file(out1 / "adapter" / "adapter_model.safetensors")
    a2 = load_file(out2 / "adapter" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys()
    # atol 1e-5 packed: full logits against the chunked loss (see test_deepspeed's equivalence test for why).
    for key in a1:
        # Finer split: a row alone and the same row padded to 1,024 in a batch round differently (other matmul
        # shapes, no mask); Adam turns that into up to ~1e-4 of a tensor's largest entry on near-zero gradients
        # (measured 7e-5), while every step's loss and gradient norm agree to 1e-6 (below).
        atol = 2e-4 * float(a1[key].abs().max()) if skewed else 1e-5 if packing else 1e-6
        assert torch.allclose(a1[key], a2[key], rtol=1e-4, atol=atol), key
    if skewed:
        rows = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (out1, out2)]
        for one, two in zip(*rows, strict=True):
            assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
            assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-6)
    # And the runs really moved: the adapters are far from their (shared) initialisation.
    assert max(float(t.abs().max()) for k, t in a1.items() if "lora_B" in k) > 1e-3


def test_library_api_example_runs_under_accelerate_launch(tmp_path, tiny_llama_dir, cache_dir):
    """examples/library_api.py: the plugin's pieces in a user's own loop, 2 ranks through the DDP launch config."""
    out = tmp_path / "out"
    example = REPO / "examples" / "library_api.py"
    overrides = [f"model.name_or_path={tiny_llama_dir}", f"output.dir={out}", "train.max_steps=3", "train.eval_steps=0"]
    proc = launch([str(example), str(REPO / "examples" / "configs" / "tiny.yaml"), *overrides], cache_dir)
    report = read_report(out)
    assert report["world_size"] == 2 and report["distributed_type"] == "MULTI_CPU"
    assert report["grad_sync_bytes_per_step"] == report["trainable_grad_bytes"]
    assert len(set(report["lora_checksum_per_rank"])) == 1
    assert report["base_checksum_after"] == [report["base_checksum_before"]] * 2
    assert report["merge"]["rel_logit_error"] <= 1e-4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "step 3/3" in proc.stdout
