"""CPU tests of qlora_dist.model: NF4 loading and freezing, LoRA attachment, the frozen-base checksum (including
bitsandbytes' CPU repack trap), parameter accounting, and the model-path errors."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qlora_dist import model as model_mod
from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
from qlora_dist.errors import ConfigError, UserError

CPU = torch.device("cpu")
LINEAR_NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(params=["llama", "qwen2"])
def tiny_dir(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def load_nf4(path: Path, quant: QuantConfig | None = None) -> nn.Module:
    return model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(path)), quant or QuantConfig(), CPU, torch.float32
    )


def with_lora(path: Path, **lora) -> nn.Module:
    torch.manual_seed(0)
    return model_mod.attach_lora(load_nf4(path), LoraConfig(dropout=0.0, **lora))


def batch(vocab: int, rows: int = 2, width: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, width), generator=gen)


def vocab_of(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def train_step(model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> float:
    model.train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def make_lora_b_nonzero(model: nn.Module, seed: int = 1) -> None:
    """peft initialises lora_B to zero, which makes the gradient of lora_A zero; give B small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


# -- loading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_load_quantizes_every_linear_but_the_head_and_freezes_everything(tiny_dir, double_quant):
    model = load_nf4(tiny_dir, QuantConfig(double_quant=double_quant))
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)

    plain_linears = {n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(four_bit) == plain_linears and plain_linears
    for name, module in four_bit.items():
        assert module.weight.quant_state is not None, name
        assert module.weight.quant_state.quant_type == "nf4"
        assert module.weight.dtype == torch.uint8
        assert (module.weight.quant_state.state2 is not None) == double_quant
    assert not any(p.requires_grad for p in model.parameters())
    assert model_mod.linear_layer_names(model) == LINEAR_NAMES


def test_qwen2_keeps_its_qkv_biases_unquantized(tiny_qwen2_dir):
    model = load_nf4(tiny_qwen2_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    plain_params = dict(plain.named_parameters())
    biased = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and m.bias is not None]
    assert biased and all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for n in biased)
    for name in biased:
        bias = model.get_submodule(name).bias
        assert not bias.requires_grad
        torch.testing.assert_close(bias.detach(), plain_params[f"{name}.bias"].detach(), rtol=0, atol=0)


def test_resolve_dtype():
    assert model_mod.resolve_dtype("auto", CPU) == torch.float32
    assert model_mod.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert model_mod.resolve_dtype("float16", CPU) == torch.float16
    assert model_mod.resolve_dtype("float32", CPU) == torch.float32


# -- LoRA --------------------------------------------------------------------------------------------------


def test_attach_lora_all_linear_trains_only_adapters_on_every_linear(tiny_dir):
    model = with_lora(tiny_dir, target_modules="all-linear")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert wrapped == set(LINEAR_NAMES)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert "lm_head" not in " ".join(trainable)


def test_attach_lora_named_list_wraps_exactly_those(tiny_qwen2_dir):
    model = with_lora(tiny_qwen2_dir, target_modules=["q_proj", "v_proj"])
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "v_proj"}
    assert len(wrapped) == 2 * 2  # two layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_params(model))
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable)


@pytest.mark.parametrize("targets", [["nope_proj"], ["q_proj", "attn_qkv"]])
def test_attach_lora_unknown_targets_is_a_config_error_listing_real_names(tiny_llama_dir, targets):
    model = load_nf4(tiny_llama_dir)
    with pytest.raises(ConfigError) as err:
        model_mod.attach_lora(model, LoraConfig(target_modules=targets))
    message = str(err.value)
    assert targets[-1] in message
    for real in ("q_proj", "v_proj", "down_proj"):
        assert real in message
    assert isinstance(err.value, UserError)


# -- the frozen-base checksum ------------------------------------------------------------------------------


def test_base_checksum_is_deterministic_and_sees_a_changed_byte(tiny_llama_dir):
    a, b = load_nf4(tiny_llama_dir), load_nf4(tiny_llama_dir)
    assert model_mod.base_checksum(a) == model_mod.base_checksum(b)
    # Attaching LoRA does not change the base (peft's names are mapped back to the base checkpoint's).
    before = model_mod.base_checksum(a)
    torch.manual_seed(0)
    peft_model = model_mod.attach_lora(a, LoraConfig())
    assert model_mod.base_checksum(peft_model) == before
    # ... and one flipped bit of one packed weight is seen.
    layer = next(m for m in b.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer.weight.data[0, 0] ^= 1
    assert model_mod.base_checksum(b) != before


def test_base_checksum_stable_across_training_steps(tiny_dir):
    model = with_lora(tiny_dir)
    make_lora_b_nonzero(model)
    before_base, before_lora = model_mod.base_checksum(model), model_mod.lora_checksum(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(vocab_of(model))
    for _ in range(2):
        train_step(model, ids, optimizer)
    assert model_mod.base_checksum(model) == before_base
    assert model_mod.lora_checksum(model) != before_lora
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("no_grad", [True, False], ids=["no_grad", "grad_enabled"])
def test_eval_forward_does_not_repack_and_training_through_biased_layers_still_works(tiny_qwen2_dir, no_grad):
    """bitsandbytes 0.50 repacks a Linear4bit weight in place on its first eval-mode forward whose input needs no
    grad (CPUs with AVX512-BF16). The load turns that off; the base bytes must survive an eval forward, and a
    training step through Qwen2's biased q/k/v afterwards must give finite gradients."""
    model = with_lora(tiny_qwen2_dir)
    make_lora_b_nonzero(model)
    ids = batch(vocab_of(model))
    before = model_mod.base_checksum(model)

    model.eval()
    with torch.no_grad() if no_grad else torch.enable_grad():
        first = model(input_ids=ids).logits
        second = model(input_ids=ids).logits
    assert model_mod.base_checksum(model) == before
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    loss = train_step(model, ids)
    assert torch.isfinite(torch.tensor(loss))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    qkv_grads = [g for n, g in grads.items() if any(f".{k}." in n for k in ("q_proj", "k_proj", "v_proj"))]
    assert qkv_grads and any(bool(g.abs().sum() > 0) for g in qkv_grads)
    assert model_mod.base_checksum(model) == before


def test_the_checksum_would_catch_the_cpu_repack_and_disable_cpu_repack_stops_it(tiny_qwen2_dir):
    """With bitsandbytes' CPU repack switched back on, an eval forward changes the base bytes (where this
    bitsandbytes and CPU repack at all), so the checksum does see the trap; ``disable_cpu_repack`` disarms it."""

    def eval_forward_changes_the_base(model: nn.Module) -> bool:
        before = model_mod.base_checksum(model)
        model.eval()
        with torch.no_grad():
            model(input_ids=batch(vocab_of(model)))
        return model_mod.base_checksum(model) != before

    def rearmed() -> nn.Module:
        model = load_nf4(tiny_qwen2_dir)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        if not all(hasattr(m, "support_avx512bf16_for_cpu") for m in layers):
            pytest.skip("this bitsandbytes has no CPU repack switch")
        for m in layers:
            m.support_avx512bf16_for_cpu = True
        return model

    if not eval_forward_changes_the_base(rearmed()):
        pytest.skip("this bitsandbytes/CPU does not repack 4-bit weights in eval")
    model = rearmed()
    model_mod.disable_cpu_repack(model)
    assert not eval_forward_changes_the_base(model)


# -- accounting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["all-linear", "q_v"])
def test_count_params_and_grad_bytes_match_a_manual_count(tiny_dir, targets):
    r = 8
    model = with_lora(tiny_dir, r=r, target_modules=targets)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    wanted = set(LINEAR_NAMES) if targets == "all-linear" else set(targets)
    lora_numel = sum(
        r * (m.in_features + m.out_features)
        for n, m in plain.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted
    )
    base_numel = sum(p.numel() for p in plain.parameters())

    trainable, total = model_mod.count_params(model)
    assert trainable == lora_numel == sum(p.numel() for p in lora_params(model).values())
    assert total == base_numel + lora_numel
    expected_bytes = sum(p.numel() * p.element_size() for p in lora_params(model).values())
    assert model_mod.trainable_grad_bytes(model) == expected_bytes == 4 * lora_numel


def test_count_params_of_a_frozen_base_counts_logical_4bit_elements(tiny_llama_dir):
    model = load_nf4(tiny_llama_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert model_mod.count_params(model) == (0, sum(p.numel() for p in plain.parameters()))
    assert model_mod.trainable_grad_bytes(model) == 0


# -- model path errors -------------------------------------------------------------------------------------


def test_check_model_path_accepts_a_model_folder(tiny_llama_dir):
    assert model_mod.check_model_path(ModelConfig(name_or_path=str(tiny_llama_dir))) == tiny_llama_dir


def test_check_model_path_missing_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError) as err:
        model_mod.check_model_path(ModelConfig(name_or_path=str(missing)))
    assert str(missing) in str(err.value)
    with pytest.raises(UserError) as err:  # the loader checks before it goes to transformers (or the hub)
        load_nf4(missing)
    assert str(missing) in str(err.value)


def test_check_model_path_folder_without_config(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as err:
        model_mod.check_model_path(ModelConfig(name_or_path=str(folder)))
    assert str(folder) in str(err.value) and "config.json" in str(err.value)


def test_check_model_path_a_file(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\0" * 8)
    with pytest.raises(UserError) as err:
        model_mod.check_model_path(ModelConfig(name_or_path=str(file)))
    assert str(file) in str(err.value) and "file" in str(err.value)


def test_missing_tokenizer_folder_names_the_key(tiny_llama_dir, tmp_path):
    missing = tmp_path / "no_tokenizer"
    with pytest.raises(UserError) as err:
        model_mod.load_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir), tokenizer=str(missing)))
    message = str(err.value)
    assert str(missing) in message and "model.tokenizer" in message and "Repo id" not in message
