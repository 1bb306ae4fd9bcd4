"""Shared test fixtures: a tiny tokenizer trained on the example data and tiny Llama/Qwen2/GPT-2 model folders.

Everything is built locally (no hub access) once per test session, under pytest's temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES_DATA = REPO / "examples" / "data"


@pytest.fixture(scope="session")
def demo_data_dir() -> Path:
    """The repo's ``examples/data`` folder (alpaca/chat/text/completion demo files)."""
    return EXAMPLES_DATA


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
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved 2-layer, hidden-64 Llama (fp32 safetensors + tokenizer), seed 0."""
    from qlora_dist.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model(out, tiny_tokenizer, arch="llama")
    return out


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved 2-layer, hidden-64 Qwen2 (biased q/k/v projections), seed 0."""
    from qlora_dist.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_qwen2")
    build_tiny_model(out, tiny_tokenizer, arch="qwen2")
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved 2-layer, hidden-64 GPT-2 (Conv1D layers: weights stored (in, out)), seed 0."""
    from qlora_dist.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_gpt2")
    build_tiny_model(out, tiny_tokenizer, arch="gpt2")
    return out
