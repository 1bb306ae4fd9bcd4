"""Shared test fixtures: a tiny tokenizer trained on the example data and tiny model folders of any architecture.

Everything is built locally (no hub access) once per test session, under pytest's temporary folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES_DATA = REPO / "examples" / "data"


@pytest.fixture(scope="session")
def demo_data_dir() -> Path:
    """The repo's ``examples/data`` folder (alpaca/chat/text/completion demo files)."""
    return EXAMPLES_DATA


@pytest.fixture(scope="session")
def alpaca_rows(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path) -> Callable[[int], Path]:
    """``alpaca_rows(n)``: a .jsonl file of the first ``n`` rows of the demo alpaca set (written once per ``n``)."""
    written: dict[int, Path] = {}

    def get(n: int) -> Path:
        if n not in written:
            rows = (demo_data_dir / "alpaca_demo.jsonl").read_text().splitlines()[:n]
            written[n] = tmp_path_factory.mktemp("data") / f"alpaca{n}.jsonl"
            written[n].write_text("\n".join(rows) + "\n")
        return written[n]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a byte-level BPE tokenizer (bos/eos/pad, chat template) trained on the demo data."""
    from qlora_dist.tiny import demo_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(demo_texts(EXAMPLES_DATA), out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    """The tiny tokenizer, loaded back with ``AutoTokenizer`` the way a run loads a real one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Callable[..., Path]:
    """``tiny_model(arch, **overrides)``: the folder of a saved 2-layer, hidden-64 model of ``arch`` (any arch
    :func:`qlora_dist.tiny.build_tiny_model` builds; fp32 safetensors + the tiny tokenizer, seed 0), built on first
    use and shared by every test of the session that asks for the same arch and overrides. Never modify it."""
    from qlora_dist.tiny import build_tiny_model

    built: dict[tuple, Path] = {}

    def get(arch: str, **overrides: Any) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            name = arch + "".join(f"_{k}-{v}" for k, v in key[1])
            out = tmp_path_factory.mktemp(f"tiny_{name}")
            build_tiny_model(out, tiny_tokenizer, arch=arch, **overrides)
            built[key] = out
        return built[key]

    return get


# The architectures tests ask for by fixture name (``tiny_llama_dir``, ...): each is ``tiny_model(arch)``.
TINY_ARCHS = {
    "llama": "Llama",
    "qwen2": "Qwen2 (biased q/k/v projections)",
    "mixtral": "Mixtral: 8 experts of ffn 224 (3.5 x hidden), top-2",
    "qwen3_moe": "Qwen3-MoE: 8 fine-grained experts (ffn 64), top-2, every layer sparse",
    "gpt2": "GPT-2 (Conv1D layers: weights stored (in, out))",
}


def _tiny_arch_fixture(arch: str, what: str):
    @pytest.fixture(scope="session", name=f"tiny_{arch}_dir")
    def fixture(tiny_model) -> Path:
        return tiny_model(arch)

    fixture.__doc__ = f"A saved 2-layer, hidden-64 {what}, seed 0 (``tiny_model({arch!r})``)."
    return fixture


for _arch, _what in TINY_ARCHS.items():
    globals()[f"tiny_{_arch}_dir"] = _tiny_arch_fixture(_arch, _what)
