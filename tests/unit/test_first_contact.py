"""A quiet, complete first contact: --version, help on every option, one strategy vocabulary, progress lines
in a log, the newer gradient-checkpointing API, the hub-id hint, and the library face's own gaps."""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

from qlora_dist.cli import build_parser
from qlora_dist.config import load_config
from qlora_dist.errors import ConfigError
from qlora_dist.progress import Progress

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_package_version():
    proc = subprocess.run([sys.executable, "-m", "qlora_dist", "--version"], capture_output=True, text=True, cwd=REPO)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert proc.returncode == 0 and proc.stdout.strip() == f"qlora-dist {version}"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.dest}"
        for name, command in sub.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing
    assert all(choice.help for choice in sub._choices_actions)  # every command is described in --help
    assert len(sub.choices) >= 8


def test_one_strategy_vocabulary(capsys):
    for name in ("auto", "ddp", "zero2", "zero3"):
        assert load_config(base={"model": {"name_or_path": "m"}, "data": {"path": "d"}, "train": {"strategy": name}})
    with pytest.raises(ConfigError, match="train.strategy=deepspeed is not a strategy name: .* zero2 and zero3"):
        load_config(base={"model": {"name_or_path": "m"}, "data": {"path": "d"}, "train": {"strategy": "deepspeed"}})
    with pytest.raises(ConfigError, match=r"train.strategy='fsdp9' is not allowed: choose one of auto \| ddp"):
        load_config(base={"model": {"name_or_path": "m"}, "data": {"path": "d"}, "train": {"strategy": "fsdp9"}})
    from qlora_dist.cli import main

    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("strategies"))
    end = next(i for i, line in enumerate(lines) if line.startswith("callbacks"))
    names = [line.split()[0] for line in lines[start + 1 : end]]
    assert {"auto", "ddp", "zero2", "zero3"} <= set(names) and "deepspeed" not in names
    readme = (REPO / "README.md").read_text()
    assert "`zero2`" in readme and "`zero3`" in readme and "train.strategy=deepspeed" not in readme


def test_progress_is_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="qlora_dist.progress")
    log_file = io.StringIO()  # not a TTY
    progress = Progress(total=5, initial=0, enabled=True, every=2, stream=log_file)
    row = {"loss": 1.25, "lr": 2e-4, "tokens_per_s": 4210.0}
    for step in range(1, 6):
        progress.update(step, row, memory_bytes=3 * 2**29)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]  # every 2 steps and the last
    assert all("tok/s" in line and "ETA" in line and "mem 1.50 GiB" in line for line in lines)
    assert log_file.getvalue() == ""  # no bar, so no carriage returns


def test_progress_is_a_bar_on_a_terminal(caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    caplog.set_level(logging.INFO, logger="qlora_dist.progress")
    screen = Terminal()
    progress = Progress(total=3, initial=0, enabled=True, every=1, stream=screen)
    for step in (1, 2, 3):
        progress.update(step, {"loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0})
    progress.close()
    assert "3/3" in screen.getvalue() and not caplog.records


def test_gradient_checkpointing_uses_the_newer_api_without_warnings(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from qlora_dist.model import enable_gradient_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_gradient_checkpointing(model)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    on = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else None
    assert on is not False and model.config.use_cache is False


def test_plan_and_check_say_how_to_use_a_local_copy_of_a_hub_model():
    """The shipped 8B example names a hub id; without a hub both commands say how to point at a local copy."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    example = str(REPO / "examples" / "configs" / "llama3_8b_alpaca.yaml")
    # Both at once: each is mostly imports, one core each.
    procs = [
        subprocess.Popen([sys.executable, "-m", "qlora_dist", command, example], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        for command in ("plan", "check")
    ]  # fmt: skip
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode in (1, 2) and "Traceback" not in out, out[-2000:]
        assert "hf download meta-llama/Meta-Llama-3-8B --local-dir ./Meta-Llama-3-8B" in out, out[-2000:]
        assert "model.name_or_path=./Meta-Llama-3-8B, a local folder holding config.json" in out


def test_readme_unknown_key_example_is_the_real_message(capsys):
    from qlora_dist.cli import main

    readme = (REPO / "README.md").read_text()
    shown = next(line for line in readme.splitlines() if line.startswith("qlora-dist: error: unknown key train.lrate"))
    assert main(["validate", str(REPO / "examples" / "configs" / "tiny.yaml"), "train.lrate=1e-4"]) == 2
    assert capsys.readouterr().err.strip() == shown
