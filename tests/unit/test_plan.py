"""The memory planner: its exact parts equal the bytes of a real loaded run, its estimates are checked against a
measurement on CPU, and ``qlora-dist plan`` works from a config.json alone (8B and 70B shapes, no weights)."""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qlora_dist import plan as plan_mod
from qlora_dist.cli import main
from qlora_dist.config import from_dict
from qlora_dist.errors import UserError
from qlora_dist.loss import token_loss_sum
from qlora_dist.model import attach_lora, enable_gradient_checkpointing, load_quantized_model
from qlora_dist.plan import GIB, LaunchPlan, parse_memory, plan_memory, read_launch_config
from qlora_dist.plugin import QLoRAPlugin

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch_configs"
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def wide_models(tiny_model) -> dict[str, Path]:
    """Hidden-256 Llama and Qwen2 (biased q/k/v): with r=16 some LoRA tensors reach bitsandbytes' 8-bit
    optimizer threshold of 4096 elements (lora_A of q_proj: 16 x 256) and some do not (lora_B of k_proj)."""
    return {arch: tiny_model(arch, hidden_size=256) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama3_8b_shape")
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    return folder


def run_config(model_dir: Path, **sections) -> dict:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"path": "unused.jsonl", "max_length": 64},
        "train": {"micro_batch_size": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------------------------------------
# Exact parts against the tensors of a loaded run


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes of the 4-bit layers as held: data + quantization state tensors, the same from
    ``quant_state.as_dict(packed=True)``: its tensors without the JSON metadata blob, plus the nested offset,
    which the packed dict writes into that blob)."""
    import bitsandbytes as bnb

    held = packed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            qs = w.quant_state
            data = w.numel() * w.element_size()
            state = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
            held += data + sum(t.numel() * t.element_size() for t in state)
            blob = {k: v for k, v in qs.as_dict(packed=True).items() if "bitsandbytes__" not in k}
            packed += data + sum(t.numel() * t.element_size() for t in blob.values())
            packed += qs.offset.numel() * qs.offset.element_size() if qs.nested else 0
    return held, packed


def state_bytes(optimizer) -> int:
    """Bytes of every optimizer state tensor, each storage once (bitsandbytes shares its quantization maps)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_exact_parts_equal_the_loaded_tensors(wide_models, arch, double_quant):
    import bitsandbytes as bnb

    raw = run_config(wide_models[arch], quant={"double_quant": double_quant, "compute_dtype": "float32"})
    config = from_dict(raw).validate()
    base = load_quantized_model(config.model, config.quant, torch.device("cpu"), torch.float32)
    layout = plan_mod.model_layout(str(wide_models[arch]))
    # The planner quantizes exactly the layers transformers did.
    loaded = sorted(n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    assert sorted(q.name for q in layout.quantized) == loaded
    held, packed = quantized_bytes(base)
    assert held == packed
    unquantized = sum(p.numel() * p.element_size() for p in base.parameters() if not isinstance(p, bnb.nn.Params4bit))
    model = attach_lora(base, config.lora)
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))

    eight_bit_seen = False
    for optimizer_name in ("adamw", "adamw_8bit", "paged_adamw_32bit"):
        raw["train"]["optimizer"] = optimizer_name
        config = from_dict(raw).validate()
        optimizer = QLoRAPlugin(config).make_optimizer(model)
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        optimizer.step()  # the state exists from the first step on
        optimizer.zero_grad(set_to_none=True)
        if optimizer_name == "adamw_8bit":
            eight_bit_seen = any(s["state1"].dtype == torch.uint8 for s in optimizer.state.values())

        planned = plan_memory(config, LaunchPlan(), gpus=1, device="cpu", layout=layout).per_gpu_bytes
        assert planned["nf4_weights"] == held
        assert planned["unquantized"] == unquantized
        assert planned["lora"] == lora
        assert planned["gradients"] == grads
        assert planned["optimizer"] == state_bytes(optimizer), optimizer_name
    assert eight_bit_seen  # the 8-bit branch (and its absmax and maps) was really exercised


def test_bfloat16_weights_and_fp32_adapters(wide_models):
    """With bf16 compute the unquantized weights (and biases) are bf16 while peft keeps LoRA in fp32."""
    import bitsandbytes as bnb

    raw = run_config(wide_models["qwen2"], quant={"compute_dtype": "bfloat16"})
    config = from_dict(raw).validate()
    base = load_quantized_model(config.model, config.quant, torch.device("cpu"), torch.bfloat16)
    unquantized = sum(p.numel() * p.element_size() for p in base.parameters() if not isinstance(p, bnb.nn.Params4bit))
    model = attach_lora(base, config.lora)
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    planned = plan_memory(config, LaunchPlan(), gpus=1, device="cpu").per_gpu_bytes
    assert planned["nf4_weights"] == quantized_bytes(base)[0]
    assert planned["unquantized"] == unquantized
    assert planned["lora"] == lora


# ----------------------------------------------------------------------------------------------------------
# The activation estimate against a measurement


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created under this mode (and not in ``known``) that are alive at once."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known, self.live, self.peak, self._refs = known, 0, 0, {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key in self._refs or nbytes == 0 or storage.data_ptr() in self.known:
                continue
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("checkpointing,chunked", [(True, True), (False, True), (True, False)])
def test_activation_estimate_matches_a_measured_step(wide_models, checkpointing, chunked):
    """Peak memory of one forward + backward over what existed before (weights, adapters, optimizer state),
    measured op by op on CPU in bfloat16 (the GPU's compute dtype), against the planned activations plus
    gradients: within 15%; with the chunked loss and with the model's full logits."""
    train = {"gradient_checkpointing": checkpointing, "chunked_loss": chunked}
    raw = run_config(wide_models["llama"], quant={"compute_dtype": "bfloat16"}, train=train)
    raw["data"]["max_length"] = 256
    config = from_dict(raw).validate()
    base = load_quantized_model(config.model, config.quant, torch.device("cpu"), torch.bfloat16)
    if checkpointing:
        enable_gradient_checkpointing(base)
    model = attach_lora(base, config.lora)
    model.train()
    ids = torch.randint(3, 900, (2, 256), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -8:] = 0  # padding: the attention mask path a real batch takes
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    known = set()
    for p in list(model.parameters()) + list(model.buffers()):
        known.add(p.untyped_storage().data_ptr())
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            extra = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
            known.update(t.untyped_storage().data_ptr() for t in extra)
    tracker = LiveBytes(known)
    with tracker:
        token_loss_sum(model, batch, 0 if chunked else None).backward()
    planned = plan_memory(config, LaunchPlan(), gpus=1, device="cpu").per_gpu_bytes
    predicted = planned["activations"] + planned["gradients"]
    assert 0.85 < predicted / tracker.peak < 1.15, (predicted, tracker.peak)


# ----------------------------------------------------------------------------------------------------------
# Strategies, big shapes, the CLI


def test_8b_shape_plans_fast_without_weights_and_plausibly(llama_8b, wide_models):
    config = from_dict(run_config(llama_8b, train={"micro_batch_size": 1}, data={"max_length": 2048})).validate()
    plan_memory(from_dict(run_config(wide_models["llama"])).validate())  # warm the imports
    start = time.perf_counter()
    plan = plan_memory(config)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0
    b = plan.per_gpu_bytes
    assert 3.2 * GIB < b["nf4_weights"] < 3.6 * GIB  # 6.98B quantized parameters at ~4.13 bits
    assert 4.5 * GIB < b["nf4_weights"] + b["unquantized"] < 6 * GIB  # + bf16 embeddings and head
    assert plan.model["params"] == 8_030_261_248  # Llama-3-8B's parameter count
    assert 7 * GIB < b["total"] < 14 * GIB
    assert b["activations_without_checkpointing"] > 4 * b["activations_with_checkpointing"]
    assert plan.fits and plan.max_micro_batch >= 8


def test_zero3_shares_shrink_with_gpus(llama_8b):
    config = from_dict(run_config(llama_8b)).validate()
    zero3 = read_launch_config(LAUNCH / "deepspeed_zero3.yaml")
    assert zero3.strategy == "zero3" and zero3.num_processes == 2
    layout = plan_mod.model_layout(str(llama_8b))
    per_gpus = {n: plan_memory(config, zero3, gpus=n, layout=layout).per_gpu_bytes for n in (1, 2, 4, 8)}
    for key in ("nf4_weights", "unquantized", "gradients", "optimizer"):
        values = [per_gpus[n][key] for n in (1, 2, 4, 8)]
        assert values == sorted(values, reverse=True) and values[-1] < values[0], key
    # The packed 4-bit data splits over the ranks; bitsandbytes' quantization state is whole on each.
    state = sum(plan_mod.nf4_layer_bytes(q.numel, True, 2)["state"] for q in layout.quantized)
    packed = per_gpus[1]["nf4_weights"] - state
    assert per_gpus[8]["nf4_weights"] == pytest.approx(state + packed / 8, rel=1e-3)
    ddp = plan_memory(config, read_launch_config(LAUNCH / "multi_gpu_ddp.yaml"), gpus=8, layout=layout)
    assert per_gpus[8]["total"] < ddp.per_gpu_bytes["total"]
    assert ddp.per_gpu_bytes["nf4_weights"] == per_gpus[1]["nf4_weights"]  # DDP: a whole replica per GPU
    # transformers never builds a 4-bit model under zero.Init: every GPU holds the whole base before DeepSpeed
    # partitions it, so that moment is counted (and is the peak on 8 GPUs).
    whole = ddp.per_gpu_bytes["nf4_weights"] + ddp.per_gpu_bytes["unquantized"] + ddp.per_gpu_bytes["overhead"]
    assert per_gpus[8]["load_peak"] == whole > per_gpus[8]["total"]


def test_fsdp2_shards_the_base_keeps_lora_whole_and_counts_the_load_peak(llama_8b):
    config = from_dict(run_config(llama_8b)).validate()
    fsdp2 = read_launch_config(LAUNCH / "fsdp2.yaml")
    assert fsdp2.strategy == "fsdp2" and fsdp2.to_env()["FSDP_VERSION"] == "2"
    layout = plan_mod.model_layout(str(llama_8b))
    ddp = plan_memory(config, read_launch_config(LAUNCH / "multi_gpu_ddp.yaml"), gpus=8, layout=layout).per_gpu_bytes
    plans = {n: plan_memory(config, fsdp2, gpus=n, layout=layout) for n in (2, 8)}
    state = sum(plan_mod.nf4_layer_bytes(q.numel, True, 1)["state"] for q in layout.quantized)
    for n, plan in plans.items():
        b = plan.per_gpu_bytes
        # The packed data and the unquantized weights split n ways (up to one row); quant state and LoRA whole.
        assert b["nf4_weights"] - state == pytest.approx((ddp["nf4_weights"] - state) / n, rel=1e-4)
        assert b["unquantized"] == pytest.approx(ddp["unquantized"] / n, rel=1e-4)
        assert (b["lora"], b["gradients"], b["optimizer"]) == (ddp["lora"], ddp["gradients"], ddp["optimizer"])
        assert b["fsdp2_gathered"] > 0 and b["comm_buffers"] == b["gradients"]
        # Loading: the whole 4-bit base on each GPU before it is sharded.
        assert b["load_peak"] == ddp["nf4_weights"] + ddp["unquantized"] + ddp["overhead"]
    assert plans[8].per_gpu_bytes["total"] < plans[2].per_gpu_bytes["total"] < ddp["total"]
    # A GPU smaller than the load peak does not fit, however small the shard.
    small = plan_memory(config, fsdp2, gpus=8, gpu_memory=4 * GIB, layout=layout)
    assert not small.fits and small.max_micro_batch == 0


def test_zero2_shards_optimizer_and_offload_moves_it_to_the_host(llama_8b):
    config = from_dict(run_config(llama_8b, train={"optimizer": "adamw"})).validate()
    layout = plan_mod.model_layout(str(llama_8b))
    ddp = plan_memory(config, read_launch_config(LAUNCH / "multi_gpu_ddp.yaml"), gpus=8, layout=layout)
    zero2 = plan_memory(config, read_launch_config(LAUNCH / "deepspeed_zero2.yaml"), gpus=8, layout=layout)
    offload = plan_memory(config, read_launch_config(LAUNCH / "deepspeed_zero3_offload.yaml"), gpus=8, layout=layout)
    assert zero2.per_gpu_bytes["nf4_weights"] == ddp.per_gpu_bytes["nf4_weights"]
    assert zero2.per_gpu_bytes["optimizer"] == pytest.approx(ddp.per_gpu_bytes["optimizer"] / 8, rel=1e-3)
    assert offload.optimizer == "deepspeed_cpu_adam" and offload.per_gpu_bytes["optimizer"] == 0
    assert offload.host["offloaded_per_process"] > 0
    assert offload.host["host_ram_bytes"] > zero2.host["host_ram_bytes"]


def test_max_micro_batch_is_the_largest_that_fits(llama_8b):
    raw = run_config(llama_8b, data={"max_length": 2048})
    layout = plan_mod.model_layout(str(llama_8b))
    best = plan_memory(from_dict(raw).validate(), gpu_memory=24 * GIB, layout=layout).max_micro_batch
    assert best >= 1
    raw["train"]["micro_batch_size"] = best
    assert plan_memory(from_dict(raw).validate(), gpu_memory=24 * GIB, layout=layout).fits
    raw["train"]["micro_batch_size"] = best + 1
    assert not plan_memory(from_dict(raw).validate(), gpu_memory=24 * GIB, layout=layout).fits
    assert plan_memory(from_dict(raw).validate(), gpu_memory=4 * GIB, layout=layout).max_micro_batch == 0


def test_cli_prints_the_table_and_json(tmp_path, llama_8b, capsys):
    cfg = write_yaml(tmp_path / "run.yaml", run_config(llama_8b))
    launch = str(LAUNCH / "deepspeed_zero3.yaml")
    assert main(["plan", str(cfg), "data.max_length=2048", "--launch-config", launch, "--gpus", "8"]) == 0
    table = capsys.readouterr().out
    assert "NF4 weights" in table and "total" in table and "zero3 on 8 GPU(s)" in table
    assert "fits in 80.00 GiB" in table and "host RAM per node" in table

    assert main(["plan", str(cfg), "--json", "--gpu-memory", "24GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    required = ("nf4_weights", "unquantized", "lora", "gradients", "optimizer", "activations", "total")
    assert all(isinstance(out["per_gpu_bytes"][k], int) for k in required)
    assert out["gpu_memory_bytes"] == 24 * GIB and out["strategy"] == "single" and out["gpus"] == 1
    assert {"fits", "max_micro_batch", "host_ram_bytes", "compute_dtype"} <= set(out)
    assert out["compute_dtype"] == "bfloat16"  # auto on the default --device cuda


def test_cli_input_errors_exit_2(tmp_path, llama_8b, capsys):
    missing = write_yaml(tmp_path / "missing.yaml", run_config(tmp_path / "no-such-model"))
    assert main(["plan", str(missing)]) == 2
    assert "no such folder" in capsys.readouterr().err
    empty = tmp_path / "empty_model"
    empty.mkdir()
    assert main(["plan", str(write_yaml(tmp_path / "empty.yaml", run_config(empty)))]) == 2
    assert "no config.json" in capsys.readouterr().err
    cfg = write_yaml(tmp_path / "run.yaml", run_config(llama_8b))
    assert main(["plan", str(cfg), "--gpu-memory", "lots"]) == 2
    assert "bad memory size" in capsys.readouterr().err
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    assert main(["plan", str(cfg), "--launch-config", str(fsdp)]) == 2
    assert "fsdp_version: 1 (FSDP1)" in capsys.readouterr().err  # accelerate's default version, refused
    fsdp.write_text("distributed_type: XLA\nnum_processes: 2\n")
    assert main(["plan", str(cfg), "--launch-config", str(fsdp)]) == 2
    assert "XLA is not planned" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--launch-config", str(tmp_path / "nope.yaml")]) == 2
    assert "launch config not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [("80GiB", 80 * GIB), ("80G", 80 * GIB), ("80GB", 80 * 10**9), ("24 GiB", 24 * GIB), ("81920MiB", 80 * GIB)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "80 XB", "-3GiB", "0GiB", "80iB"])
def test_parse_memory_rejects(text):
    with pytest.raises(UserError):
        parse_memory(text)


def test_launch_config_without_mapping_or_with_stage_1_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="not an accelerate launch config"):
        read_launch_config(bad)
    bad.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 1\n")
    with pytest.raises(UserError, match="stage 1"):
        read_launch_config(bad)


def test_check_command_verdict_uses_this_gpus_memory(monkeypatch, tmp_path, llama_8b):
    """``qlora-dist check`` (doctor) asks the planner for one line; not fitting is a warning with a fix."""
    from types import SimpleNamespace

    cfg = write_yaml(tmp_path / "run.yaml", run_config(llama_8b, data={"max_length": 2048}))
    memory = {"total": 80 * GIB}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=memory["total"]))
    verdict = plan_mod.doctor_verdict(str(cfg), [], str(LAUNCH / "deepspeed_zero3.yaml"), 8)
    assert isinstance(verdict, str) and "GiB per GPU of 80.0 GiB (zero3, 8 GPU(s))" in verdict
    memory["total"] = 12 * GIB
    level, message = plan_mod.doctor_verdict(str(cfg), ["train.micro_batch_size=8"], None, None)
    assert level == "warning" and "train.micro_batch_size=" in message


def test_launch_from_accelerate_environment():
    env = {
        "WORLD_SIZE": "4",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
    }
    launch = plan_mod.launch_from_env(env)
    assert (launch.strategy, launch.num_processes, launch.offloads_optimizer, launch.zero3_init) == (
        "zero3",
        4,
        True,
        True,
    )
    assert plan_mod.launch_from_env({"WORLD_SIZE": "2"}).strategy == "ddp"
    assert plan_mod.launch_from_env({}).strategy == "single"
