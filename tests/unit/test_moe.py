"""NF4 mixture-of-experts (``qlora_dist.quant.moe``) on tiny Mixtral and Qwen3-MoE models, single process.

Checked from the tensors themselves: the expert weights are packed NF4 per expert (bitsandbytes' own
``quantize_4bit`` bytes), the forward equals dequantize-then-run-the-stock-experts example by example, LoRA
sits on the experts (and the linear targets) but never on the router, dropout is applied, gradients reach the
adapter and never the frozen experts, and the planner's byte counts equal the loaded model's.
"""

from __future__ import annotations

import copy

import bitsandbytes.functional as F
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qlora_dist import model as model_mod
from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
from qlora_dist.errors import ConfigError
from qlora_dist.quant import moe

ARCHS = ["tiny_mixtral_dir", "tiny_qwen3_moe_dir"]

# Both sides multiply the same dequantized float32 weights (bitsandbytes dequantizes the same codes and absmax
# the same way); only the kernels' accumulation order differs (bitsandbytes' gemm_4bit against grouped_mm or
# F.linear; x@A@B added against a merged W + BA), i.e. float32 rounding: ~1e-7 relative. 1e-5 leaves margin,
# while a wrong expert, routing weight, gate/up half or LoRA scale changes the logits by O(1).
REL_TOL = 1e-5


def _load(model_dir, storage="uint8"):
    return model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(model_dir)), QuantConfig(storage_dtype=storage), torch.device("cpu"), torch.float32
    )


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, moe.NF4Experts)]


def _stock_experts(nf4: moe.NF4Experts, config, implementation: str, delta=None) -> nn.Module:
    """transformers' own experts module holding ``nf4``'s dequantized weights (+ ``delta[matrix]``)."""
    config = copy.deepcopy(config)
    config._experts_implementation = implementation
    ref = nf4.source_class(config)
    for name in moe.EXPERT_MATRICES:
        weight = nf4.dequantized(name) + (delta[name] if delta and name in delta else 0)
        setattr(ref, name, nn.Parameter(weight, requires_grad=False))
    return ref


def _swap(model, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    old = {}
    for name, new in modules.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        old[name] = getattr(owner, child)
        setattr(owner, child, new)
    return old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def batch():
    return torch.randint(5, 400, (4, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_are_nf4_per_expert(arch, request):
    model_dir = request.getfixturevalue(arch)
    original = load_file(model_dir / "model.safetensors")
    model = _load(model_dir)
    experts = _experts(model)
    assert len(experts) == 2  # one per decoder layer
    # No fused expert weight is left in a float dtype anywhere in the model.
    floating_3d = [n for n, p in model.named_parameters() if p.dim() == 3 or ("experts" in n and p.is_floating_point())]
    assert floating_3d == []
    for name, module in experts:
        layer = name.split(".")[2]
        for matrix in moe.EXPERT_MATRICES:
            param = getattr(module, matrix)
            state = param.quant_state
            assert isinstance(state, F.QuantState) and isinstance(state, moe.ExpertsQuantState)
            assert param.dtype == torch.uint8 and not param.requires_grad
            e, out_f, in_f = state.shape
            assert param.shape == (e, out_f * in_f // 2) and e == 8  # two 4-bit codes per byte
            for i in (0, e - 1):
                ref = _checkpoint_expert(original, layer, i, matrix)
                packed, ref_state = F.quantize_4bit(
                    ref, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
                )
                # The bytes are bitsandbytes' own NF4 + double quantization of this expert alone.
                assert torch.equal(param[i], packed.reshape(-1))
                ours = state.experts[i]
                assert ours.quant_type == "nf4" and ours.nested and ours.blocksize == 64
                assert torch.equal(ours.absmax, ref_state.absmax)
                assert torch.equal(F.dequantize_4bit(param[i].view(-1, 1), ours), F.dequantize_4bit(packed, ref_state))
    if arch == "tiny_mixtral_dir":
        fp32 = sum(t.numel() * 4 for t in original.values())
        # Mixtral-shaped: the frozen base held is at most 0.35 of the fp32 model (the bar).
        assert model_mod.local_base_bytes(model) / fp32 <= 0.35
    # Logical sizes count the experts whole (parameter counts, planner, reports).
    assert model_mod.count_params(model)[1] == sum(t.numel() for t in original.values())


def _checkpoint_expert(original, layer, i, matrix):
    """Expert ``i``'s [gate; up] or down matrix from the checkpoint's own per-expert layout."""
    mixtral = f"model.layers.{layer}.block_sparse_moe.experts.{i}."
    qwen = f"model.layers.{layer}.mlp.experts.{i}."
    if mixtral + "w1.weight" in original:
        parts = ["w1", "w3"] if matrix == "gate_up_proj" else ["w2"]
        return torch.cat([original[f"{mixtral}{p}.weight"] for p in parts])
    parts = ["gate_proj", "up_proj"] if matrix == "gate_up_proj" else ["down_proj"]
    return torch.cat([original[f"{qwen}{p}.weight"] for p in parts])


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_dequantized_stock_experts(arch, request, batch):
    """Per example and batched, base only and with LoRA: NF4 experts == stock experts on dequantized weights."""
    model = _load(request.getfixturevalue(arch)).eval()
    config = model.config
    with torch.no_grad():
        ours = [model(input_ids=batch[i : i + 1]).logits for i in range(len(batch))]
        ours_batched = model(input_ids=batch).logits
        for implementation in ("eager", "grouped_mm"):
            stock = {n: _stock_experts(m, config, implementation) for n, m in _experts(model)}
            saved = _swap(model, stock)
            try:
                for i, row in enumerate(ours):
                    assert _rel(row, model(input_ids=batch[i : i + 1]).logits) <= REL_TOL
                assert _rel(ours_batched, model(input_ids=batch).logits) <= REL_TOL
            finally:
                _swap(model, saved)

    # With LoRA (random, non-zero B): our per-expert LoRA == stock experts on W + (B @ A) * alpha / r.
    torch.manual_seed(0)
    peft_model = model_mod.attach_lora(
        model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "experts"])
    )
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, moe.LoraExperts)}
        ours = peft_model(input_ids=batch).logits
        plain = {}
        for name, layer in layers.items():
            w = layer.lora_experts["default"]
            delta = {
                m: moe.expert_delta({"A": getattr(w, f"{m}_A"), "B": getattr(w, f"{m}_B")}, 2.0) for m in layer.matrices
            }
            plain[name] = _stock_experts(layer.base_layer, config, "eager", delta)
        saved = _swap(peft_model, plain)
        reference = peft_model(input_ids=batch).logits
        _swap(peft_model, saved)
        base_only = _swap(peft_model, {n: layer.base_layer for n, layer in layers.items()})
        without = peft_model(input_ids=batch).logits
        _swap(peft_model, base_only)
    assert _rel(ours, reference) <= REL_TOL
    assert _rel(ours, without) > 100 * REL_TOL  # the LoRA term is really there


def test_lora_on_experts_not_router(tiny_mixtral_dir, batch):
    model = _load(tiny_mixtral_dir)
    torch.manual_seed(0)
    peft_model = model_mod.attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable)
    assert not any(".mlp.gate." in n for n in trainable)  # the router is left alone
    expert_lora = moe.expert_lora_names(peft_model)
    assert len(expert_lora) == 2 * 4  # 2 layers x gate_up/down x A/B
    attention = {n.split(".self_attn.")[1].split(".")[0] for n in trainable if ".self_attn." in n}
    assert attention == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # Per-expert shapes: A experts x r x in, B experts x out x r.
    shapes = {n.rsplit(".", 1)[-1]: tuple(p.shape) for n, p in peft_model.named_parameters() if n in expert_lora}
    assert shapes == {
        "gate_up_proj_A": (8, 4, 64),
        "gate_up_proj_B": (8, 448, 4),
        "down_proj_A": (8, 4, 224),
        "down_proj_B": (8, 64, 4),
    }
    # peft saves them with the adapter.
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(peft_model)
    assert sum(1 for k in saved if moe.LORA_KEY.fullmatch(k)) == len(expert_lora)

    # Gradients reach the expert LoRA (A too, once B is non-zero) and never the frozen experts or router.
    peft_model.train()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if n.endswith("_B") or ".lora_B." in n:
                p.normal_(0, 0.05)
    peft_model(input_ids=batch, labels=batch).loss.backward()
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    # Dropout on the experts' LoRA input: train mode is stochastic, eval mode is not.
    with torch.no_grad():
        a, b = (peft_model(input_ids=batch[:1]).logits for _ in range(2))
        peft_model.eval()
        c, d = (peft_model(input_ids=batch[:1]).logits for _ in range(2))
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_expert_targets(tiny_qwen3_moe_dir):
    model = _load(tiny_qwen3_moe_dir)
    torch.manual_seed(0)
    only_q = model_mod.attach_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    assert moe.expert_lora_names(only_q) == []
    model = _load(tiny_qwen3_moe_dir)
    gate_up = model_mod.attach_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "gate_up_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in moe.expert_lora_names(gate_up)} == {"gate_up_proj_A", "gate_up_proj_B"}
    with pytest.raises(ConfigError, match="names only the experts"):
        model_mod.attach_lora(_load(tiny_qwen3_moe_dir), LoraConfig(r=4, alpha=8, target_modules=["experts"]))
    with pytest.raises(ConfigError, match="match no linear layer"):
        model_mod.attach_lora(_load(tiny_qwen3_moe_dir), LoraConfig(r=4, alpha=8, target_modules=["gate"]))


def test_checksum_covers_every_expert_state(tiny_mixtral_dir):
    """The frozen-base checksum hashes every expert's quantization state, not only the first one's."""
    model = _load(tiny_mixtral_dir)
    before = model_mod.base_checksum(model)
    _, module = _experts(model)[1]
    state = module.down_proj.quant_state.experts[-1]
    state.absmax[0] += 1
    assert model_mod.base_checksum(model) != before


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_planner_counts_the_nf4_experts_exactly(tiny_mixtral_dir, storage):
    """The planner's exact parts (NF4 weights + state, unquantized, LoRA) equal the loaded tensors' bytes."""
    import bitsandbytes as bnb

    from qlora_dist import plan as plan_mod
    from qlora_dist.config import from_dict

    raw = {
        "model": {"name_or_path": str(tiny_mixtral_dir)},
        "quant": {"compute_dtype": "float32", "storage_dtype": storage},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": "unused.jsonl", "max_length": 32},
    }
    config = from_dict(raw).validate()
    base = _load(tiny_mixtral_dir, storage)
    held = unquantized = 0
    for p in base.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            unquantized += p.numel() * p.element_size()
            continue
        held += p.numel() * p.element_size()
        for s in getattr(qs, "experts", [qs]):
            tensors = [s.absmax, s.code] + ([s.state2.absmax, s.state2.code, s.offset] if s.nested else [])
            held += sum(t.numel() * t.element_size() for t in tensors)
        assert isinstance(p, bnb.nn.Params4bit) or isinstance(qs, moe.ExpertsQuantState)
    total = model_mod.count_params(base)[1]
    lora = sum(p.numel() * 4 for p in model_mod.attach_lora(base, config.lora).parameters() if p.requires_grad)
    layout = plan_mod.model_layout(str(tiny_mixtral_dir))
    assert len(layout.experts) == 4 and all(x.experts == 8 for x in layout.experts)
    planned = plan_mod.plan_memory(config, plan_mod.LaunchPlan(), gpus=1, device="cpu", layout=layout)
    assert planned.per_gpu_bytes["nf4_weights"] == held
    assert planned.per_gpu_bytes["unquantized"] == unquantized
    assert planned.per_gpu_bytes["lora"] == lora
    assert planned.model["params"] == total


def test_check_knows_the_expert_targets(tiny_mixtral_dir, demo_data_dir, tmp_path):
    """``qlora-dist check`` (meta model, no weights) accepts the expert target names and gives the same
    refusal as a run for experts without a linear target."""
    import yaml

    from qlora_dist import doctor

    raw = {
        "model": {"name_or_path": str(tiny_mixtral_dir)},
        "data": {"path": str(demo_data_dir / "alpaca_demo.jsonl")},
        "output": {"dir": str(tmp_path / "out")},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))

    def lora_finding(targets: str):
        findings = doctor.run_checks(str(config), [f"lora.target_modules={targets}"])
        return next(f for f in findings if f.check == "lora")

    assert lora_finding("[q_proj,experts]").level == "ok"
    refused = lora_finding("[experts]")
    assert refused.level == "error" and "names only the experts" in refused.message


def test_rslora_adapter_on_experts_merges_to_what_it_computes(tiny_mixtral_dir, tmp_path):
    """An adapter saved with ``use_rslora`` (trained elsewhere) scales every LoRA, the experts' too, by
    alpha / sqrt(r): the unmerged model the merge is verified against and the merge itself must agree, so the
    verified merge passes (rank 4: a wrong scale is off by a factor 2)."""
    import json

    from qlora_dist.merge import merge_command

    model = _load(tiny_mixtral_dir)
    torch.manual_seed(0)
    peft_model = model_mod.attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if n.endswith("_B") or ".lora_B." in n:
                p.normal_(0, 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    report = merge_command(str(tiny_mixtral_dir), str(adapter), tmp_path / "merged", "dequantized", "float32")
    assert report["verified"] is True and report["rel_logit_error"] < 1e-4, report
