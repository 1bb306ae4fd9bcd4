"""Run-config loading: typing, overrides, and the errors a user sees for bad input."""

from __future__ import annotations

import pytest

from qlora_dist.config import RunConfig, load_config
from qlora_dist.errors import ConfigError

BASE = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_match_the_public_interface():
    cfg = load_config(base=BASE)
    assert cfg.model.trust_remote_code is False
    assert cfg.quant.double_quant is True and cfg.quant.compute_dtype == "auto"
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.train.optimizer == "paged_adamw_8bit" and cfg.train.gradient_checkpointing is True
    assert cfg.output.merge is True and cfg.output.merge_base == "dequantized"


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string: the field's type must coerce it.
    p = write(tmp_path, "model: {name_or_path: m}\ndata: {path: d.jsonl}\ntrain: {lr: 3e-4, epochs: 2}\n")
    cfg = load_config(p)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2


def test_overrides_win_and_are_typed(tmp_path):
    p = write(tmp_path, "model: {name_or_path: m}\ndata: {path: d.jsonl}\ntrain: {lr: 1.0e-3}\n")
    cfg = load_config(p, ["train.lr=5e-5", "train.gradient_checkpointing=false", "lora.target_modules=q_proj,v_proj"])
    assert cfg.train.lr == pytest.approx(5e-5)
    assert cfg.train.gradient_checkpointing is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown key train.lrr: allowed keys in train are"),
        (["trian.lr=1"], "unknown key trian: allowed keys in the config are"),
        (["train.optimizer=sgd"], "train.optimizer='sgd' is not allowed: choose one of paged_adamw_8bit"),
        (["train.epochs=two"], "train.epochs='two' is not an integer"),
        (["train.epochs=0"], "train.epochs=0 is out of range: must be >= 1"),
        (["lora.dropout=1.0"], "lora.dropout=1.0 is out of range"),
        (
            ["data.format=xml"],
            "data.format='xml' is not allowed: choose one of auto | chat | alpaca | completion | text",
        ),
        (["train.eval_steps=5"], "train.eval_steps=5 needs held-out data: set data.eval_fraction"),
        (["quant.compute_dtype=fp8"], "quant.compute_dtype='fp8' is not allowed"),
        (["output.merge=maybe"], "output.merge='maybe' is not a boolean"),
        (["lr=1"], "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(base=BASE, overrides=overrides)
    assert message in str(e.value)


def test_required_keys():
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(base={"data": {"path": "x"}})
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(base={"model": {"name_or_path": "x"}})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "model:\n  name_or_path: m\ntrain: {lr: [1,\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: invalid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(base=BASE, overrides=["train.lr=1e-4", "lora.target_modules=[q_proj]"])
    p = write(tmp_path, cfg.to_yaml())
    again = load_config(p)
    assert again == cfg and isinstance(again, RunConfig)
