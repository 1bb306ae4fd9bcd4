"""FSDP2 in one process (a gloo group of one: the same ``fully_shard`` code, DTensors and all) and its refusals.

The evidence behind two rules of ``qlora_dist.strategies.fsdp2``: LoRA kept out of FSDP steps with
bitsandbytes' optimizers while sharded LoRA cannot; and a mixed-precision policy breaks packed 4-bit weights
stored in float32 but not in uint8 or the policy's own dtype. Then every refusal of ``check`` on the launch
config that breaks it, and not on the nearest good one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

from qlora_dist import model as model_mod
from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
from qlora_dist.doctor import run_checks
from qlora_dist.strategies.fsdp2 import shard_model

REPO_LAUNCH = os.path.join(os.path.dirname(__file__), "..", "..", "launch_configs", "fsdp2.yaml")
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


@pytest.fixture(scope="module")
def group():
    """A gloo process group of one, for this module only."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _qlora(model_dir, storage="uint8"):
    base = model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(model_dir)), QuantConfig(storage_dtype=storage), torch.device("cpu"), torch.float32
    )
    torch.manual_seed(0)
    return model_mod.attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0))


def _step(model, optimizer) -> None:
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"])
def test_replicated_lora_steps_bitsandbytes_optimizers(group, tiny_llama_dir, optimizer):
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    model = _qlora(tiny_llama_dir)
    shard_model(model, torch.device("cpu"), 1)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert all(isinstance(p, DTensor) for p in model.parameters() if not p.requires_grad)  # the base is sharded
    assert lora and not any(isinstance(p, DTensor) for p in lora)  # LoRA is not
    before = [p.detach().clone() for p in lora]
    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}.get(
        optimizer, bnb.optim.PagedAdamW32bit
    )
    _step(model, cls(lora, lr=1e-3))
    assert any(not torch.equal(a, p) for a, p in zip(before, lora, strict=True))


@pytest.mark.parametrize("kind", ["qwen2", "tied"])
def test_biased_and_tied_models_shard_and_step(group, tiny_model, kind):
    """Qwen2's biased q/k/v projections, and a head tied to the embeddings (one parameter in the root unit)."""
    import bitsandbytes as bnb

    model = _qlora(tiny_model("qwen2") if kind == "qwen2" else tiny_model("llama", tie_word_embeddings=True))
    before = model_mod.base_checksum(model)
    shard_model(model, torch.device("cpu"), 1)
    lora = [p for p in model.parameters() if p.requires_grad]
    _step(model, bnb.optim.PagedAdamW8bit(lora, lr=1e-3))
    assert model_mod.base_checksum(model) == before  # gathered after a step: the same frozen bytes


def test_sharded_lora_breaks_bitsandbytes_optimizers(group, tiny_llama_dir):
    """Why LoRA is left out of FSDP: sharded, its weights are DTensors bitsandbytes' kernels cannot step."""
    import bitsandbytes as bnb

    model = _qlora(tiny_llama_dir)
    shard_model(model, torch.device("cpu"), 1, shard_lora=True)
    lora = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises((NotImplementedError, RuntimeError), match="sharding strategy|DTensor"):
        _step(model, bnb.optim.PagedAdamW8bit(lora, lr=1e-3))


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "uint8"])
def test_mixed_precision_breaks_only_storage_it_casts(group, tiny_llama_dir, storage):
    """FSDP's param_dtype casts packed 4-bit data stored in float32 (bitsandbytes then reads a wrong shape);
    uint8 is not cast, and bfloat16 storage already is the policy's dtype."""
    model = _qlora(tiny_llama_dir, storage)
    shard_model(model, torch.device("cpu"), 1, param_dtype=torch.bfloat16)
    if storage == "float32":
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            model(input_ids=IDS)
    else:
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def _launch_error(tmp_path, model_dir, data, launch_edits=None, overrides=()):
    """``qlora-dist check``'s launch finding for fsdp2.yaml with ``launch_edits`` applied to its mapping."""
    raw = yaml.safe_load(Path(REPO_LAUNCH).read_text())
    for key, value in (launch_edits or {}).items():
        section, _, name = key.rpartition(".")
        (raw[section] if section else raw)[name] = value
    launch = tmp_path / "launch.yaml"
    launch.write_text(yaml.safe_dump(raw))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": {"name_or_path": str(model_dir)}, "data": {"path": str(data), "format": "alpaca"}})
    )
    (finding,) = [f for f in run_checks(str(cfg), list(overrides), str(launch)) if f.check == "launch"]
    assert "strategy fsdp2" in finding.message or finding.level == "error", finding
    return finding.message if finding.level == "error" else None


REFUSALS = [
    # (launch config edits, run-config overrides, what the error says, the nearest good launch / overrides)
    ({"fsdp_config.fsdp_version": 1}, [], "fsdp_version: 1 (FSDP1)", ({}, [])),
    ({"fsdp_config.fsdp_cpu_ram_efficient_loading": True}, [], "set fsdp_config.fsdp_cpu_ram_efficient_loading: false",
     ({"fsdp_config.fsdp_cpu_ram_efficient_loading": False}, [])),
    ({"fsdp_config.fsdp_offload_params": True}, [], "fsdp_offload_params: true", ({}, [])),
    ({"fsdp_config.fsdp_activation_checkpointing": True}, [], "train.gradient_checkpointing=true", ({}, [])),
    ({"fsdp_config.fsdp_auto_wrap_policy": "SIZE_BASED_WRAP"}, [], "TRANSFORMER_BASED_WRAP", ({}, [])),
    ({"mixed_precision": "bf16"}, ["quant.storage_dtype=float32"], "set quant.storage_dtype=uint8 (or bfloat16)",
     ({"mixed_precision": "bf16"}, ["quant.storage_dtype=bfloat16"])),
    ({"mixed_precision": "bf16"}, ["quant.storage_dtype=float16"], "FSDP would cast the packed 4-bit weights",
     ({"mixed_precision": "bf16"}, [])),
    ({"mixed_precision": "fp16"}, [], "set mixed_precision: bf16", ({"mixed_precision": "bf16"}, [])),
    ({}, ["train.strategy=zero3"], "train.strategy=zero3 but the launch config gives fsdp2",
     ({}, ["train.strategy=fsdp2"])),
]  # fmt: skip


@pytest.mark.parametrize(("edits", "overrides", "message", "good"), REFUSALS)
def test_each_refusal_fires_on_its_config_and_not_the_nearest_good_one(
    tmp_path, tiny_llama_dir, small_alpaca_unit, edits, overrides, message, good
):
    error = _launch_error(tmp_path, tiny_llama_dir, small_alpaca_unit, edits, overrides)
    assert error is not None and message in error, error
    assert _launch_error(tmp_path, tiny_llama_dir, small_alpaca_unit, *good) is None


@pytest.fixture(scope="module")
def small_alpaca_unit(tmp_path_factory, demo_data_dir):
    return demo_data_dir / "alpaca_demo.jsonl"


def test_fsdp2_launch_resolves_to_fsdp2_and_reads_fsdp_config():
    from qlora_dist.config import load_config
    from qlora_dist.errors import ConfigError
    from qlora_dist.plan import read_launch_config
    from qlora_dist.strategies import resolve_strategy

    base = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}
    env = read_launch_config(REPO_LAUNCH).to_env(2)  # what `accelerate launch --config_file fsdp2.yaml` exports
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    strategy = resolve_strategy(load_config(base=base), env)
    assert (strategy.name, strategy.version, strategy.reshard_after_forward) == ("fsdp2", 2, True)
    assert strategy.storage_dtype(load_config(base=base), torch.bfloat16) == "uint8"
    assert strategy.optimizer_name("paged_adamw_8bit") == "paged_adamw_8bit"  # nothing switched
    kept = resolve_strategy(load_config(base=base), {**env, "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert kept.reshard_after_forward is False
    # train.strategy=fsdp2 under a DDP launch names the launch config to use.
    with pytest.raises(ConfigError, match="train.strategy=fsdp2 but the launch config gives ddp: launch with "
                       "launch_configs/fsdp2.yaml"):  # fmt: skip
        resolve_strategy(load_config(base=base, overrides=["train.strategy=fsdp2"]), {"WORLD_SIZE": "2"})
