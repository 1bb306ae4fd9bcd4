"""CPU tests of qlora_dist.merge: a LoRA adapter trained on the NF4 base (tiny Llama and tiny Qwen2) is merged
into the dequantized base and saved as a plain transformers model that reproduces the QLoRA model; the standalone
``qlora-dist merge`` (``merge_command``) rebuilds the same weights from the saved adapter alone."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_dist import merge as merge_mod
from qlora_dist import model as model_mod
from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
from qlora_dist.errors import UserError

CPU = torch.device("cpu")
DTYPE = torch.float32
MAX_ERROR = 1e-4
# Llama with the default quantization (NF4 + double quant); Qwen2 (biased q/k/v) without double quantization, so
# that merge_command reproducing its weights shows the settings recorded beside the adapter are really used.
QUANT = {"llama": QuantConfig(), "qwen2": QuantConfig(double_quant=False)}


@dataclass
class Trained:
    arch: str
    base_dir: Path
    model: nn.Module  # the trained QLoRA (peft) model, in eval mode
    adapter_dir: Path
    merged_dir: Path
    report: dict
    original_dir: Path
    original_report: dict
    check_batches: list[torch.Tensor]
    probe_batches: list[torch.Tensor]  # never seen by the merge's own check


def token_batches(vocab: int, seed: int, count: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, 10 + 3 * i), generator=gen) for i in range(count)]


def rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((candidate - reference).norm() / reference.norm())


@torch.no_grad()
def logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(input_ids=b).logits.float().flatten() for b in batches])


def merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_quant_meta(adapter_dir: Path, quant: QuantConfig, compute_dtype: torch.dtype) -> None:
    """What QLoRAPlugin.finish writes beside the adapter."""
    meta = {"quant": dataclasses.asdict(quant), "compute_dtype": str(compute_dtype).replace("torch.", "")}
    (adapter_dir / merge_mod.QUANT_META).write_text(json.dumps(meta))


def train_qlora(base_dir: Path, quant: QuantConfig, steps: int = 3) -> nn.Module:
    base = model_mod.load_quantized_model(ModelConfig(name_or_path=str(base_dir)), quant, CPU, DTYPE)
    torch.manual_seed(0)
    model = model_mod.attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.05))
    # peft starts lora_B at zero (a no-op adapter); random B makes the merged delta clearly non-trivial.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.train()
    for ids in token_batches(vocab, seed=2, count=steps):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def merge_like_finish(
    model: nn.Module, adapter_dir: Path, base_dir: Path, out: Path, merge_base: str, tokenizer, check: list
) -> dict:
    """What QLoRAPlugin.finish does on one process: reference logits of the QLoRA model in eval, the NF4 base
    dequantized (for ``dequantized``), then ``merge_trained``."""
    model.eval()
    reference, loss = merge_mod.logits_of(model, check), merge_mod.loss_of(model, check)
    dequantized = merge_mod.dequantized_base_weights(model, DTYPE) if merge_base == "dequantized" else None
    return merge_mod.merge_trained(
        adapter_dir, dequantized, str(base_dir), out, DTYPE, tokenizer, check, reference, reference_loss=loss
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory) -> Trained:
    arch = request.param
    base_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    root = tmp_path_factory.mktemp(f"merge_{arch}")
    model = train_qlora(base_dir, QUANT[arch])
    checksum = model_mod.base_checksum(model)

    adapter_dir = root / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    write_quant_meta(adapter_dir, QUANT[arch], DTYPE)

    vocab = model.get_input_embeddings().weight.shape[0]
    check = token_batches(vocab, seed=3)
    report = merge_like_finish(model, adapter_dir, base_dir, root / "merged", "dequantized", tokenizer, check)
    original = merge_like_finish(model, adapter_dir, base_dir, root / "merged_original", "original", tokenizer, check)
    assert model_mod.base_checksum(model) == checksum  # merging reads the base, never changes it
    return Trained(
        arch, base_dir, model, adapter_dir, root / "merged", report, root / "merged_original", original, check,
        probe_batches=token_batches(vocab, seed=4),
    )  # fmt: skip


def test_merged_folder_is_a_plain_safetensors_model_with_tokenizer(trained):
    files = {p.name for p in trained.merged_dir.iterdir()}
    assert "config.json" in files
    assert any(name.endswith(".safetensors") for name in files)
    assert not list(trained.merged_dir.rglob("*.bin"))
    assert "tokenizer_config.json" in files and ("tokenizer.json" in files or "vocab.json" in files)
    assert not any("lora" in key for key in merged_weights(trained.merged_dir))
    assert not trained.merged_dir.with_name("merged.tmp").exists()
    assert not trained.original_dir.with_name("merged_original.tmp").exists()

    merged = AutoModelForCausalLM.from_pretrained(trained.merged_dir)
    assert type(merged).__name__.lower().startswith(trained.arch)
    tokenizer = AutoTokenizer.from_pretrained(trained.merged_dir)
    assert tokenizer("hello")["input_ids"] == AutoTokenizer.from_pretrained(trained.base_dir)("hello")["input_ids"]


def test_merge_report(trained):
    report = trained.report
    assert report["base"] == "dequantized" and report["dtype"] == "float32"
    assert report["checked_sequences"] == len(trained.check_batches)
    assert report["path"] == str(trained.merged_dir)
    assert report["rel_logit_error"] is not None and 0 <= report["rel_logit_error"] <= MAX_ERROR


@torch.no_grad()
def hf_mean_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """The mean next-token loss over all tokens of ``batches`` by transformers' own ``labels=`` loss (the full
    logits), independent of qlora_dist.loss."""
    model.eval()
    total = sum(float(model(input_ids=b, labels=b).loss) * (b.shape[1] - 1) for b in batches)
    return total / sum(b.shape[1] - 1 for b in batches)


def test_merge_report_records_both_next_token_losses(trained):
    """The merge check also takes the next-token loss of base + adapter and of the merged model with the training
    loss function; both are recorded with their difference and bound, and agree with transformers' own loss."""
    report = trained.report
    reference, merged = report["reference_loss"], report["merged_loss"]
    assert reference == pytest.approx(hf_mean_loss(trained.model, trained.check_batches), rel=1e-5)
    merged_model = AutoModelForCausalLM.from_pretrained(trained.merged_dir, dtype=DTYPE)
    assert merged == pytest.approx(hf_mean_loss(merged_model, trained.check_batches), rel=1e-5)
    assert report["loss_difference"] == merged - reference
    assert report["loss_bound"] == pytest.approx(merge_mod.LOSS_BOUNDS[DTYPE] * reference)
    assert abs(report["loss_difference"]) <= report["loss_bound"] and report["verified"] is True
    # Into the original weights the losses are recorded, not bounded; they differ by the quantization error.
    original = trained.original_report
    assert original["reference_loss"] == reference and original["loss_bound"] is None
    assert abs(original["loss_difference"]) > abs(report["loss_difference"])


def test_a_corrupted_merge_fails_the_loss_check(trained, tmp_path, monkeypatch):
    """Fault injection: the output head written 3x too large (the kind of slip a head-specific scale or cast
    makes), with the logit bound switched off, so only the loss comparison can catch it: ``qlora-dist merge``
    refuses, names the loss, and leaves nothing at ``--out``. (The loss moves by ~1e-2 relative, 70x the fp32
    bound, on both architectures.)"""
    real = merge_mod._merged_tensor

    def wrong(name, tensor, dtype, nf4, lora, transposed=False, **kwargs):
        out = real(name, tensor, dtype, nf4, lora, transposed, **kwargs)
        return out * 3 if name == "lm_head.weight" else out

    monkeypatch.setattr(merge_mod, "_merged_tensor", wrong)
    monkeypatch.setattr(merge_mod, "MERGE_BOUNDS", dict.fromkeys(merge_mod.MERGE_BOUNDS, float("inf")))
    out = tmp_path / "corrupted"
    with pytest.raises(UserError, match="next-token loss of .* over the bound") as caught:
        merge_mod.merge_command(str(trained.base_dir), str(trained.adapter_dir), out, "dequantized", "auto")
    assert "relative logit error" not in str(caught.value)  # the loss check alone refused it
    assert not out.exists() and not out.with_name("corrupted.tmp").exists()


def test_merged_model_reproduces_the_qlora_model_independently(trained):
    """Reload the saved merge from disk and compare with the QLoRA model on sequences the merge did not check."""
    merged = AutoModelForCausalLM.from_pretrained(trained.merged_dir, dtype=DTYPE)
    reference = logits(trained.model, trained.probe_batches)
    assert rel_error(reference, logits(merged, trained.probe_batches)) <= MAX_ERROR
    # The adapter really changes the model: the plain base is far from it (else the check above proves nothing).
    base = AutoModelForCausalLM.from_pretrained(trained.base_dir, dtype=DTYPE)
    assert rel_error(reference, logits(base, trained.probe_batches)) > 100 * MAX_ERROR


def test_merging_into_the_original_base_is_further_from_the_trained_model(trained):
    assert trained.original_report["base"] == "original"
    dequantized = merged_weights(trained.merged_dir)
    original = merged_weights(trained.original_dir)
    assert dequantized.keys() == original.keys()
    assert any(not torch.equal(dequantized[k], original[k]) for k in dequantized)

    reference = logits(trained.model, trained.probe_batches)
    err_dequantized = rel_error(
        reference, logits(AutoModelForCausalLM.from_pretrained(trained.merged_dir), trained.probe_batches)
    )
    err_original = rel_error(
        reference, logits(AutoModelForCausalLM.from_pretrained(trained.original_dir), trained.probe_batches)
    )
    assert err_original > err_dequantized
    assert trained.original_report["rel_logit_error"] > trained.report["rel_logit_error"]


def test_merge_command_reproduces_merge_trained_bit_for_bit(trained, tmp_path):
    out = tmp_path / "standalone"
    info = merge_mod.merge_command(str(trained.base_dir), str(trained.adapter_dir), out, "dequantized", "auto")
    assert info["base"] == "dequantized" and info["dtype"] == "float32"
    saved = json.loads((out / merge_mod.MERGE_REPORT).read_text())
    assert saved["verified"] is True and abs(saved["loss_difference"]) <= saved["loss_bound"]
    assert saved["merged_loss"] == pytest.approx(saved["reference_loss"], rel=merge_mod.LOSS_BOUNDS[DTYPE])
    expected, got = merged_weights(trained.merged_dir), merged_weights(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (out / "tokenizer_config.json").is_file()
    assert not out.with_name("standalone.tmp").exists()


def test_merge_command_original_matches_merge_trained_original(trained, tmp_path):
    out = tmp_path / "standalone_original"
    merge_mod.merge_command(str(trained.base_dir), str(trained.adapter_dir), out, "original", "float32")
    expected, got = merged_weights(trained.original_dir), merged_weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_merge_command_uses_the_recorded_quant_settings(trained, tmp_path):
    """Without qlora_dist.json the command assumes NF4 + double quant: for the Qwen2 adapter, trained without
    double quantization, that is a different base, so the recorded settings are what made the merge exact."""
    if trained.arch != "qwen2":
        pytest.skip("only the Qwen2 adapter was trained with non-default quantization")
    adapter = tmp_path / "adapter_without_meta"
    shutil.copytree(trained.adapter_dir, adapter)
    (adapter / merge_mod.QUANT_META).unlink()
    out = tmp_path / "merged_assumed"
    merge_mod.merge_command(str(trained.base_dir), str(adapter), out, "dequantized", "float32")
    expected, got = merged_weights(trained.merged_dir), merged_weights(out)
    assert any(not torch.equal(expected[k], got[k]) for k in expected)


def test_merge_command_accepts_an_empty_out_folder(trained, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    merge_mod.merge_command(str(trained.base_dir), str(trained.adapter_dir), out, "original", "float32")
    assert any(out.glob("*.safetensors"))


# -- argument checks of the standalone merge (they run before anything loads) ---------------------------------


@pytest.fixture
def fake_adapter(tmp_path) -> Path:
    """Enough of an adapter folder to pass the argument checks."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    return adapter


def test_merge_command_refuses_a_non_empty_out_folder(tiny_llama_dir, fake_adapter, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError) as err:
        merge_mod.merge_command(str(tiny_llama_dir), str(fake_adapter), out, "dequantized", "auto")
    assert str(out) in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_merge_command_rejects_a_folder_that_is_no_adapter(tiny_llama_dir, tmp_path):
    not_adapter = tmp_path / "nothing_here"
    not_adapter.mkdir()
    with pytest.raises(UserError) as err:
        merge_mod.merge_command(str(tiny_llama_dir), str(not_adapter), tmp_path / "out", "dequantized", "auto")
    assert str(not_adapter) in str(err.value) and "adapter_config.json" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_merge_command_out_is_a_file(tiny_llama_dir, fake_adapter, tmp_path):
    out = tmp_path / "merged.safetensors"
    out.write_text("x")
    with pytest.raises(UserError) as err:
        merge_mod.merge_command(str(tiny_llama_dir), str(fake_adapter), out, "dequantized", "auto")
    assert str(out) in str(err.value) and "--out" in str(err.value)
    assert out.read_text() == "x"


def test_merge_command_missing_base_names_the_flag(fake_adapter, tmp_path):
    missing = tmp_path / "no_base"
    with pytest.raises(UserError) as err:
        merge_mod.merge_command(str(missing), str(fake_adapter), tmp_path / "out", "dequantized", "auto")
    assert str(missing) in str(err.value)
    assert "--base" in str(err.value)
