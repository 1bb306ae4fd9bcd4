"""Real 2-process runs of mixture-of-experts models with NF4 experts: a tiny Mixtral under DDP and FSDP2 and a
tiny Qwen3-MoE under ZeRO-3, all with LoRA (dropout 0.1) on the attention linears and on every expert.

One run per strategy serves every assertion: the world size the workers saw, a frozen base (experts included)
that is bit-identical before and after on every rank, identical adapters on every rank, expert LoRA saved
(and trained) but none on the router, the frozen base's bytes per rank, and a merged model that plain
transformers loads and that reproduces an independently rebuilt NF4 base + adapter. One more DDP launch
resumes the DDP run from its step-2 checkpoint and must end with the same adapter, bit for bit. Every run
loads the base through the quantized-base cache (rank 1 and the resumed run read what rank 0 wrote).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_dist import model as model_mod
from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
from qlora_dist.quant import moe

from .conftest import launch, read_report, write_run_config

pytestmark = pytest.mark.distributed

LORA = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}
TRAIN = {"max_steps": 4, "optimizer": "adamw", "lr": 1e-2, "save_steps": 2}
RUNS = {
    "ddp": ("multi_gpu_ddp.yaml", "tiny_mixtral_dir"),
    "zero3": ("deepspeed_zero3.yaml", "tiny_qwen3_moe_dir"),
    "fsdp2": ("fsdp2.yaml", "tiny_mixtral_dir"),
}


@pytest.fixture(scope="module")
def moe_runs(request, tmp_path_factory, small_alpaca, cache_dir):
    tmp = tmp_path_factory.mktemp("moe")
    runs = {}
    for name, (launch_config, model_fixture) in RUNS.items():
        model_dir = request.getfixturevalue(model_fixture)
        out = tmp / name
        cfg = write_run_config(tmp / f"{name}.yaml", model_dir, small_alpaca, out, lora=LORA, train=TRAIN)
        launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir, launch_config)
        runs[name] = (model_dir, out, read_report(out))
    return runs


@pytest.mark.parametrize("name", list(RUNS))
def test_moe_run_trains_experts_lora_and_merges(moe_runs, name):
    model_dir, out, report = moe_runs[name]
    assert report["world_size"] == 2 and report["strategy"] == name
    assert report["base_checksum_after"] == [report["base_checksum_before"]] * 2
    assert len(set(report["lora_checksum_per_rank"])) == 1
    assert report["final_loss"] < report["initial_loss"]
    # Quantized once per machine (base_cache.py), NF4 experts included, under every strategy (ZeRO-3 too):
    # rank 1 loaded the packed base rank 0 wrote, and its base checksum after the run is rank 0's before
    # (checked above), which is that of a fresh quantization (below).
    loads = report["base_load_per_rank"]
    assert loads[0]["source"] in ("built", "cache") and loads[1]["source"] == "cache"
    assert loads[0]["cache_dir"] == loads[1]["cache_dir"] and loads[1]["reason"] is None
    assert loads[1]["file_bytes"] == sum(f.stat().st_size for f in Path(loads[1]["cache_dir"]).glob("*.safetensors"))
    assert any(Path(loads[1]["cache_dir"]).glob(f"{moe.EXPERTS_FILE_PREFIX}*.safetensors"))

    # The adapter: LoRA on every expert of every layer (trained: B moved off zero) and on the attention
    # linears; nothing on the router.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in adapter.values())
    experts = {k: t for k, t in adapter.items() if moe.LORA_KEY.fullmatch(k)}
    assert len(experts) == 2 * 4 and all(t.shape[0] == 8 for t in experts.values())
    assert all(float(t.abs().max()) > 0 for k, t in experts.items() if k.endswith("_B"))
    assert not any(".mlp.gate." in k for k in adapter)
    assert {k.split(".self_attn.")[1].split(".")[0] for k in adapter if ".self_attn." in k} == {
        "q_proj", "k_proj", "v_proj", "o_proj",
    }  # fmt: skip

    # An independent NF4 load with the run's storage dtype: experts held in 4 bits (from the tensors), and the
    # same frozen-base checksum the run reported, so those are the bytes the run trained against.
    storage = report["quant_storage_dtype"]
    base = model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(model_dir)), QuantConfig(storage_dtype=storage), torch.device("cpu"), torch.float32
    )
    assert model_mod.base_checksum(base) == report["base_checksum_before"]
    fused = [m for m in base.modules() if isinstance(m, moe.NF4Experts)]
    assert len(fused) == 2
    for module in fused:
        for matrix in moe.EXPERT_MATRICES:
            param = getattr(module, matrix)
            assert str(param.dtype).endswith(storage) and isinstance(param.quant_state, moe.ExpertsQuantState)
            assert param.quant_state.quant_type == "nf4" and all(s.nested for s in param.quant_state.experts)

    # The frozen base each rank held: at most 0.35 of the fp32 model for the Mixtral shape (DDP: a whole
    # replica), about half of a whole NF4 replica per rank under ZeRO-3 and FSDP2 (both shard the packed experts).
    fp32 = sum(t.numel() * 4 for t in load_file(model_dir / "model.safetensors").values())
    whole = model_mod.local_base_bytes(base)
    if name == "ddp":
        assert report["base_bytes_per_rank"] == [whole] * 2 and whole / fp32 <= 0.35
    else:
        assert all(abs(held - whole / 2) <= 0.02 * whole for held in report["base_bytes_per_rank"])

    # NF4 base + the saved adapter (our expert LoRA included) against the merged folder loaded by plain
    # transformers: equal to fp32 rounding (1e-4), while the adapter moves the logits far more than that.
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    qlora = model_mod.attach_lora(base, LoraConfig(**LORA))
    result = set_peft_model_state_dict(qlora, adapter)
    assert not [k for k in result.unexpected_keys]
    qlora.eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    with torch.no_grad():
        ref, got = qlora(input_ids=ids).logits, merged(input_ids=ids).logits
        with qlora.disable_adapter():
            untrained = qlora(input_ids=ids).logits
    assert float((got - ref).norm() / ref.norm()) <= 1e-4
    assert float((untrained - ref).norm() / ref.norm()) > 1e-3
    assert report["merge"]["rel_logit_error"] <= 1e-4 and report["merge"]["method"] == "in-memory"
    # The merged folder keeps the checkpoint's own expert layout (per-expert tensors, as the base has them).
    assert set(load_file(out / "merged" / "model.safetensors")) == set(load_file(model_dir / "model.safetensors"))


def test_moe_resume_is_exact(moe_runs, cache_dir):
    """Resumed from the step-2 checkpoint (expert LoRA, optimizer state, per-rank RNG for dropout), the DDP
    run reaches the same adapter as the uninterrupted one: the expert LoRA travels with the checkpoint."""
    model_dir, out, report = moe_runs["ddp"]
    resumed = out.with_name("ddp-resumed")
    shutil.copytree(out / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    cfg = write_run_config(
        resumed.with_suffix(".yaml"),
        model_dir,
        report_data(out),
        resumed,
        lora=LORA,
        train=TRAIN,
        output={"merge": False},
    )
    launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir, "multi_gpu_ddp.yaml")
    again = read_report(resumed)
    assert again["world_size"] == 2 and again["resumed_from_step"] == 2
    # A later run on the same machine: both ranks load the quantized base the first run cached.
    assert [load["source"] for load in again["base_load_per_rank"]] == ["cache", "cache"]
    first = load_file(out / "adapter" / "adapter_model.safetensors")
    second = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and any(moe.LORA_KEY.fullmatch(k) for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def report_data(out):
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["data"]["path"]
