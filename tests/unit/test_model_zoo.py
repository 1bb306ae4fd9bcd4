"""The model zoo: every family a user may bring either trains as verified QLoRA or is refused before training.

One table of tiny random models (hidden 64, 2 layers, the shared tiny tokenizer), each built once. For a QLoRA
family a real single-process ``qlora-dist train`` runs a few steps; the measured 4-bit share must be at least
half of the decoder weights and equal what ``check`` predicts from config.json; the merged folder of training
and of ``qlora-dist merge`` must each reproduce NF4 base + adapter (fp32, 1e-4), loaded with plain transformers.
A refused family must fail ``check`` and ``train`` with one ``qlora-dist: error`` line, no traceback, and
nothing written: no family of the table is refused any more (MoE experts are NF4 since quant/moe.py), so a
Falcon with its own linear class left unswapped is the refused (and ``quant.allow_unquantized``) case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlora_dist import merge as merge_mod
from qlora_dist.cli import main as cli_main
from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
from qlora_dist.errors import ConfigError
from qlora_dist.model import attach_lora, base_checksum, load_quantized_model
from qlora_dist.quant import coverage, moe

CPU = torch.device("cpu")
BOUND = 1e-4

# arch (qlora_dist.tiny), build overrides, expected outcome. MoE experts are fused 3-D parameters bitsandbytes
# does not quantize: qlora_dist holds them in NF4 itself (quant/moe.py), and the share counts them.
TABLE = [
    ("llama", {}, "qlora"),
    ("llama", {"tie_word_embeddings": True}, "qlora"),
    ("mistral", {}, "qlora"),
    ("qwen2", {}, "qlora"),
    ("qwen3", {}, "qlora"),
    ("phi3", {}, "qlora"),  # fused qkv_proj / gate_up_proj
    ("gemma2", {}, "qlora"),
    ("gemma3_text", {}, "qlora"),
    ("gpt_neox", {}, "qlora"),
    ("falcon", {}, "qlora"),  # FalconLinear, built as nn.Linear so that bitsandbytes quantizes it
    ("gpt2", {}, "qlora"),  # Conv1D: (in, out) weights
    ("mixtral", {}, "qlora"),  # NF4 experts, merged in memory
    ("qwen3_moe", {}, "qlora"),
]
IDS = [arch + ("-tied" if over.get("tie_word_embeddings") else "") for arch, over, _ in TABLE]


@pytest.fixture(scope="module")
def small_alpaca_rows(alpaca_rows) -> Path:
    return alpaca_rows(16)


def run_config(path: Path, model_dir: Path, data: Path, out: Path, **quant) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "quant": {"compute_dtype": "float32", **quant},
        # dropout 0.05: with peft's own all-linear a MoE router got a ParamWrapper, which refuses dropout.
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "data": {"path": str(data), "format": "alpaca", "max_length": 48},
        "train": {"micro_batch_size": 4, "max_steps": 3, "lr": 1e-2, "seed": 7, "warmup_ratio": 0.0, "log_steps": 1},
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def probe_batches(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (1, 12 + 5 * i), generator=gen) for i in range(2)]


@torch.no_grad()
def logits(model, batches) -> torch.Tensor:
    return torch.cat([model(input_ids=b).logits.float().flatten() for b in batches])


def rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((candidate - reference).norm() / reference.norm())


def one_error_line(stderr: str) -> str:
    """The one ``qlora-dist: error`` line of ``stderr`` (progress lines logged before it may precede it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("qlora-dist: error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize(("arch", "overrides", "expected"), TABLE, ids=IDS)
def test_family_trains_as_verified_qlora_or_is_refused(
    arch, overrides, expected, tiny_model, small_alpaca_rows, tmp_path, capsys
):
    model_dir = tiny_model(arch, **overrides)
    out = tmp_path / "run"
    cfg = run_config(tmp_path / "run.yaml", model_dir, small_alpaca_rows, out)
    predicted, _ = coverage.predict_for(ModelConfig(name_or_path=str(model_dir)), QuantConfig(), torch.float32)
    assert expected == "qlora"  # the refusal: test_allow_unquantized_trains_a_base_bitsandbytes_leaves_...
    assert predicted.fraction >= coverage.MIN_FRACTION

    assert cli_main(["train", str(cfg)]) == 0
    report = json.loads((out / "run_report.json").read_text())
    assert report["world_size"] == 1
    # The measured share: at least half, and what check predicted from config.json alone.
    assert report["quantized_fraction"] >= coverage.MIN_FRACTION
    assert report["quantized_fraction"] == pytest.approx(predicted.fraction)
    assert report["quantization"]["qlora"] is True and report["quantization"]["allow_unquantized"] is False
    merge = report["merge"]
    assert merge["verified"] is True and merge["rel_logit_error"] <= BOUND and merge["path"] == str(out / "merged")

    # Reference: NF4 base + the saved adapter, unmerged, built here independently of the run.
    base = load_quantized_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(), CPU, torch.float32)
    if moe.has_nf4_experts(base):
        # The experts count as 4-bit (their ExpertsQuantState), none is among the largest full-precision weights;
        # the router is no LoRA target. plain peft cannot load the expert LoRA: attach ours, load the saved state.
        largest = report["quantization"]["largest_unquantized"]
        assert not [x for x in largest if "experts" in x["name"]], largest
        adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert "gate" not in adapter_cfg["target_modules"]
        # Through the quantized-base cache, NF4 experts included (base_cache.py): its bytes are the ones trained.
        assert [x["source"] for x in report["base_load_per_rank"]] in (["built"], ["cache"])
        assert base_checksum(base) == report["base_checksum_before"]
        qlora = attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.05))
        result = set_peft_model_state_dict(qlora, load_file(out / "adapter" / "adapter_model.safetensors"))
        assert not result.unexpected_keys and moe.expert_lora_names(qlora)
        qlora.eval()
    else:
        qlora = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    lora_b = [p for n, p in qlora.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # training moved the adapter off zero
    batches = probe_batches(qlora.get_input_embeddings().weight.shape[0])
    reference = logits(qlora, batches)

    merged_again = tmp_path / "merged_again"
    args = ["merge", "--base", str(model_dir), "--adapter", str(out / "adapter"), "--out", str(merged_again)]
    assert cli_main([*args, "--data", str(small_alpaca_rows)]) == 0
    merge_report = json.loads((merged_again / merge_mod.MERGE_REPORT).read_text())
    assert merge_report["verified"] is True and merge_report["rel_logit_error"] <= BOUND
    assert merge_report["check_data"] == str(small_alpaca_rows) and merge_report["checked_sequences"] == 4
    for folder in (out / "merged", merged_again):
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(plain).__name__ == type(qlora.get_base_model()).__name__
        assert rel(reference, logits(plain, batches)) <= BOUND, folder


def test_allow_unquantized_trains_a_base_bitsandbytes_leaves_full_precision_and_the_report_says_so(
    tiny_model, small_alpaca_rows, tmp_path, capsys, monkeypatch
):
    """A family whose linear layers are a class of their own is not quantized by bitsandbytes: Falcon, with its
    ``FalconLinear`` left as it is (no :mod:`qlora_dist.quant.layers` swap). Refused by default; trained with
    ``quant.allow_unquantized=true``, and then the report says it is not QLoRA."""
    from qlora_dist.quant import layers

    monkeypatch.setattr(layers, "LINEAR_EQUIVALENTS", {})
    model_dir = tiny_model("falcon")
    out = tmp_path / "run"
    cfg = run_config(tmp_path / "run.yaml", model_dir, small_alpaca_rows, out)
    predicted, _ = coverage.predict_for(ModelConfig(name_or_path=str(model_dir)), QuantConfig(), torch.float32)
    assert predicted.fraction < coverage.MIN_FRACTION
    capsys.readouterr()
    assert cli_main(["check", str(cfg)]) == 1
    checked = capsys.readouterr().out
    assert [line for line in checked.splitlines() if line.startswith("error")] == [
        next(line for line in checked.splitlines() if line.startswith("error   quant"))
    ]
    assert "quant.allow_unquantized=true" in checked and "FalconLinear" in checked
    assert cli_main(["train", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not quantized" in line and "FalconLinear" in line and "quant.allow_unquantized=true" in line
    assert not out.exists()

    # quant.cache=false: the falcon row's run cached its base with the swap; this monkeypatch is code the cache
    # key does not (and need not) cover.
    cfg = run_config(tmp_path / "run.yaml", model_dir, small_alpaca_rows, out, allow_unquantized=True, cache=False)
    assert cli_main(["train", str(cfg), "output.merge=false"]) == 0
    report = json.loads((out / "run_report.json").read_text())
    q = report["quantization"]
    assert report["quantized_fraction"] < coverage.MIN_FRACTION and q["qlora"] is False and q["allow_unquantized"]
    decoder = [x for x in q["largest_unquantized"] if x["decoder_weight"]]
    assert decoder and all(x["module"] == "FalconLinear" for x in decoder), q["largest_unquantized"]
    assert report["world_size"] == 1


def test_a_merge_over_the_bound_leaves_nothing_and_fails(tiny_model, small_alpaca_rows, tmp_path, capsys, monkeypatch):
    """Fault injection: a merge that writes wrong weights (here: noise on every LoRA-merged tensor) must be caught
    by both merges' own checks: ``qlora-dist merge`` exits 2 with no ``--out``; training exits 2 with no
    ``merged/`` and the report saying ``verified: false``."""
    model_dir = tiny_model("gpt2")
    good = tmp_path / "good"
    cfg = run_config(tmp_path / "run.yaml", model_dir, small_alpaca_rows, good)
    assert cli_main(["train", str(cfg), "output.merge=false"]) == 0

    real = merge_mod._merged_tensor

    def wrong(name, tensor, dtype, nf4, lora, transposed=False, **kwargs):
        out = real(name, tensor, dtype, nf4, lora, transposed, **kwargs)
        return out + 0.05 * torch.randn_like(out) if lora is not None else out

    monkeypatch.setattr(merge_mod, "_merged_tensor", wrong)
    capsys.readouterr()
    out = tmp_path / "merged"
    assert cli_main(["merge", "--base", str(model_dir), "--adapter", str(good / "adapter"), "--out", str(out)]) == 2
    assert "over the bound" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not out.with_name("merged.tmp").exists()
    # --no-verify writes it, and says in merge_report.json that it was not verified.
    assert (
        cli_main(
            ["merge", "--base", str(model_dir), "--adapter", str(good / "adapter"), "--out", str(out), "--no-verify"]
        )
        == 0
    )
    assert json.loads((out / merge_mod.MERGE_REPORT).read_text())["verified"] is False

    bad = tmp_path / "bad"
    assert cli_main(["train", str(cfg), f"output.dir={bad}"]) == 2
    assert "merge check failed" in one_error_line(capsys.readouterr().err)
    report = json.loads((bad / "run_report.json").read_text())
    assert report["merge"]["verified"] is False and report["merge"]["path"] is None
    assert report["merge"]["rel_logit_error"] > BOUND and not (bad / "merged").exists()
    assert (bad / "adapter" / "adapter_model.safetensors").is_file()


def test_targets_resolve_to_real_names_and_an_empty_resolution_is_an_error(tiny_model):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from qlora_dist.model import meta_model, resolve_targets

    gpt2 = meta_model(ModelConfig(name_or_path=str(tiny_model("gpt2"))))
    assert resolve_targets(gpt2, LoraConfig()) == ["c_attn", "c_fc", "c_proj"]
    # A model with no linear layer at all (here: every projection swapped for an identity).
    config = AutoConfig.from_pretrained(tiny_model("gpt2"))
    with init_empty_weights():
        bare = AutoModelForCausalLM.from_config(config)
    for name, _ in list(bare.named_modules()):
        if name.rsplit(".", 1)[-1] in ("c_attn", "c_fc", "c_proj"):
            bare.set_submodule(name, torch.nn.Identity())
    with pytest.raises(ConfigError, match="no linear layer LoRA can target"):
        resolve_targets(bare, LoraConfig())


def test_moe_routers_are_not_lora_targets():
    """A router written as an nn.Linear (``gate`` beside ``experts``, or ``router``) is left out of all-linear; a
    dense MLP's ``gate`` is a real projection and stays."""
    from torch import nn

    from qlora_dist.model import linear_layer_names

    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4)
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.router = nn.Linear(8, 4)

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = nn.Linear(8, 8), nn.Linear(8, 8)

    assert linear_layer_names(Moe()) == ["0", "1", "2", "3"]
    assert linear_layer_names(Dense()) == ["gate", "up"]


def test_a_peft_error_during_set_up_is_one_config_error_line(tiny_model, monkeypatch):
    import peft

    model = load_quantized_model(ModelConfig(name_or_path=str(tiny_model("llama"))), QuantConfig(), CPU, torch.float32)

    def refuse(*args, **kwargs):
        raise ValueError("lora.ParamWrapper does not work with lora_dropout != 0.\nmore detail")

    monkeypatch.setattr(peft, "get_peft_model", refuse)
    with pytest.raises(ConfigError) as e:
        attach_lora(model, LoraConfig(dropout=0.05))
    assert "\n" not in str(e.value) and "lora.dropout=0.05" in str(e.value) and "ParamWrapper" in str(e.value)
