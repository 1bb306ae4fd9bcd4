"""``qlora-dist check``: every rule fires on a config that breaks it, and not on the nearest good config.

Models for the real-model example configs are config-only folders (a hand-written ``config.json`` of the real
architecture plus the tiny tokenizer): the checks never load weights, so that is all they need.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_dist import doctor
from qlora_dist.errors import UserError

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch_configs"
DATA = REPO / "examples" / "data"

ARCHS = {
    "llama3_8b_alpaca.yaml": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    },
    "mistral_7b_chat.yaml": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32768,
    },
    "qwen2_5_7b_completion.yaml": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    },
}  # fmt: skip
FORMAT_DATA = {"alpaca": "alpaca_demo.jsonl", "chat": "chat_demo.jsonl", "completion": "completion_demo.jsonl"}


def config_only_model(folder: Path, arch: dict, tokenizer_dir: Path, chat_template: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**arch, "torch_dtype": "bfloat16"}))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    if not chat_template:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def levels(findings) -> dict[str, str]:
    return {f.check: f.level for f in findings}


def messages(findings) -> dict[str, str]:
    return {f.check: f.message for f in findings}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_each_shipped_example_config_passes(name, tmp_path, tiny_tokenizer_dir):
    config = REPO / "examples" / "configs" / name
    fmt = __import__("yaml").safe_load(config.read_text())["data"]["format"]
    model = config_only_model(tmp_path / "model", ARCHS[name], tiny_tokenizer_dir)
    overrides = [
        f"model.name_or_path={model}",
        f"data.path={DATA / FORMAT_DATA[fmt]}",
        f"output.dir={tmp_path / 'out'}",
    ]
    findings = doctor.run_checks(str(config), overrides, str(LAUNCH / "multi_gpu_ddp.yaml"), 8)
    assert all(f.level == "ok" for f in findings), [(f.check, f.message) for f in findings if f.level != "ok"]
    assert "B parameters" in messages(findings)["model"]  # the real 7-8B shape, built without weights


def test_tiny_example_passes_under_every_launch_config(tmp_path, tiny_llama_dir):
    config = REPO / "examples" / "configs" / "tiny.yaml"
    overrides = [
        f"model.name_or_path={tiny_llama_dir}",
        f"data.path={DATA / 'alpaca_demo.jsonl'}",
        f"output.dir={tmp_path}",
    ]
    for launch in ("single_gpu.yaml", "multi_gpu_ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        findings = doctor.run_checks(str(config), overrides, str(LAUNCH / launch))
        assert all(f.level == "ok" for f in findings), (
            launch,
            [(f.check, f.message) for f in findings if f.level != "ok"],
        )
    offload = doctor.run_checks(str(config), overrides, str(LAUNCH / "deepspeed_zero3_offload.yaml"))
    assert levels(offload)["launch"] == "warning" and "becomes deepspeed_cpu_adam" in messages(offload)["launch"]


@pytest.fixture
def base(tmp_path, tiny_llama_dir):
    """A good run config, and a way to check it with a few settings changed."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_llama_dir}}}\n"
        f"data: {{path: {DATA / 'alpaca_demo.jsonl'}, format: alpaca}}\noutput: {{dir: {tmp_path / 'out'}}}\n"
    )

    def check(overrides=(), launch="multi_gpu_ddp.yaml"):
        return doctor.run_checks(str(config), list(overrides), str(LAUNCH / launch) if launch else None)

    return check


def test_nearest_good_config_passes(base):
    assert set(levels(base()).values()) == {"ok"}


def test_zero3_storage_dtype_rule(base):
    bad = base(["quant.storage_dtype=uint8"], launch="deepspeed_zero3.yaml")
    assert levels(bad)["launch"] == "error" and "set quant.storage_dtype=auto" in messages(bad)["launch"]
    assert levels(base(["quant.storage_dtype=auto"], launch="deepspeed_zero3.yaml"))["launch"] == "ok"


def test_strategy_contradicting_the_launch_rule(base):
    bad = base(["train.strategy=zero3"], launch="multi_gpu_ddp.yaml")
    assert levels(bad)["launch"] == "error" and "launch_configs/deepspeed_zero3.yaml" in messages(bad)["launch"]
    assert levels(base(["train.strategy=ddp"]))["launch"] == "ok"


def test_target_modules_rule(base):
    bad = base(["lora.target_modules=[q_proj,qkv_proj]"])
    assert levels(bad)["lora"] == "error" and "qkv_proj match no linear layer" in messages(bad)["lora"]
    assert "q_proj" in messages(bad)["lora"]  # the real names, to pick from
    assert levels(base(["lora.target_modules=[q_proj,v_proj]"]))["lora"] == "ok"


def test_bad_data_row_rule(base, tmp_path):
    rows = (DATA / "alpaca_demo.jsonl").read_text().splitlines()[:5]
    bad_row = json.loads(rows[3])
    del bad_row["output"]
    rows[3] = json.dumps(bad_row)
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("\n".join(rows) + "\n")
    bad = base([f"data.path={bad_file}"])
    assert levels(bad)["data"] == "error" and f"{bad_file}, line 4: field 'output' is missing" in messages(bad)["data"]
    good_file = tmp_path / "good.jsonl"
    good_file.write_text("\n".join(rows[:3]) + "\n")
    assert levels(base([f"data.path={good_file}"]))["data"] == "ok"


def test_chat_template_rule(base, tmp_path, tiny_tokenizer_dir):
    arch = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}  # fmt: skip
    plain = config_only_model(tmp_path / "plain", arch, tiny_tokenizer_dir, chat_template=False)
    chat = [f"data.path={DATA / 'chat_demo.jsonl'}", "data.format=chat"]
    bad = base([f"model.name_or_path={plain}", *chat])
    assert levels(bad)["data"] == "error" and "has no chat template" in messages(bad)["data"]
    with_template = config_only_model(tmp_path / "chat", arch, tiny_tokenizer_dir, chat_template=True)
    assert levels(base([f"model.name_or_path={with_template}", *chat]))["data"] == "ok"


def test_prequantized_model_rule(base, tmp_path, tiny_tokenizer_dir):
    arch = {**ARCHS["llama3_8b_alpaca.yaml"], "quantization_config": {"quant_method": "gptq", "bits": 4}}
    bad = base([f"model.name_or_path={config_only_model(tmp_path / 'gptq', arch, tiny_tokenizer_dir)}"])
    assert levels(bad)["model"] == "error" and "pre-quantized with gptq" in messages(bad)["model"]


def test_version_rule(base, monkeypatch):
    monkeypatch.setitem(doctor.MINIMUM_VERSIONS, "peft", ("999.0", "a feature from the future"))
    bad = base()
    assert (
        levels(bad)["versions"] == "error"
        and "need >= 999.0 for a feature from the future" in messages(bad)["versions"]
    )


def test_disk_rule(base, monkeypatch):
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 10))
    bad = base()
    assert levels(bad)["disk"] == "error" and "output.merge=false" in messages(bad)["disk"]


def test_bad_launch_config_file(base, tmp_path):
    with pytest.raises(UserError, match="launch config not found"):
        doctor.launch_env(str(tmp_path / "nope.yaml"), None)


def test_check_cli_exit_codes(base, tmp_path, tiny_llama_dir):
    config = tmp_path / "run.yaml"
    # Both at once: each is mostly imports, one core each.
    ok, bad = (
        subprocess.Popen([sys.executable, "-m", "qlora_dist", "check", str(config), *overrides],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for overrides in ([], ["lora.target_modules=[nope]"])
    )  # fmt: skip
    ok_out, _ = ok.communicate(timeout=300)
    bad_out, _ = bad.communicate(timeout=300)
    assert ok.returncode == 0 and "0 error(s)" in ok_out
    assert bad.returncode == 1 and "error   lora" in bad_out and "1 error(s)" in bad_out


def test_train_runs_the_checks_first(base, tmp_path):
    """A bad target module stops `train` before any weight is loaded or output written."""
    config = tmp_path / "run.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "qlora_dist", "train", str(config), "lora.target_modules=[nope]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2 and "lora: lora.target_modules: nope match no linear layer" in run.stderr
    assert "run `qlora-dist check`" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_library_rules_device_map_auto_and_reentrant_under_ddp(monkeypatch, tiny_llama_dir):
    """Rules a run config cannot break (qlora_dist never does these) but a user's own script could."""
    import torch

    from qlora_dist import model as model_mod
    from qlora_dist.config import ModelConfig, QuantConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match='device_map="auto" with several processes'):
        model_mod.load_quantized_model(
            ModelConfig(name_or_path=str(tiny_llama_dir)),
            QuantConfig(),
            torch.device("cpu"),
            torch.float32,
            device_map="auto",
        )
    net = model_mod.load_quantized_model(
        ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(), torch.device("cpu"), torch.float32
    )
    with pytest.raises(UserError, match="Expected to mark a variable ready only once"):
        model_mod.enable_gradient_checkpointing(net, reentrant=True)
    model_mod.enable_gradient_checkpointing(net, reentrant=False)  # the nearest good setting
    monkeypatch.setenv("WORLD_SIZE", "1")
    model_mod.enable_gradient_checkpointing(net, reentrant=True)  # fine for a single process
