"""What every benchmark harness shares: the model shapes and the builder of their random Llamas, the machine
and library line, replacing one section of BENCHMARKS.md, and the environment child processes run in (this
folder importable, nothing online)."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


@dataclass(frozen=True)
class ModelShape:
    """The size of a decoder, in the names :class:`benchmarks.throughput.Setup` uses."""

    hidden_size: int
    layers: int
    intermediate_size: int
    heads: int
    kv_heads: int
    vocab_size: int = 0
    """0: the tokenizer's own."""

    def config_kwargs(self) -> dict[str, Any]:
        """The same shape in a transformers config's names (``LlamaConfig(**shape.config_kwargs())``)."""
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            **({"vocab_size": self.vocab_size} if self.vocab_size else {}),
        }

    def name(self) -> str:
        """``h64-l2-i128-a4-kv2`` (with ``-v<vocab>`` when set): a folder name for a model of this shape."""
        name = f"h{self.hidden_size}-l{self.layers}-i{self.intermediate_size}-a{self.heads}-kv{self.kv_heads}"
        return name + (f"-v{self.vocab_size}" if self.vocab_size else "")


TINY_LLAMA = ModelShape(hidden_size=64, layers=2, intermediate_size=128, heads=4, kv_heads=2)
"""The smoke shape every harness's quick run uses: 2 layers, hidden 64, grouped-query attention (4 / 2 heads)."""
LLAMA3_8B = ModelShape(hidden_size=4096, layers=32, intermediate_size=14336, heads=32, kv_heads=8, vocab_size=128256)
"""Llama 3 8B: about 8.0e9 parameters."""


def build_llama(
    folder: Path, shape: ModelShape, texts: Iterable[str], dtype: str = "float32", tokenizer_vocab: int = 4096
) -> Path:
    """A random Llama of ``shape`` saved in ``dtype`` with a byte-level tokenizer trained on ``texts``, in
    ``folder``: built once (written beside it and renamed into place), reused while ``folder`` holds it.
    The weights are initialised on the GPU when there is one (an 8B shape takes minutes on a CPU)."""
    import torch

    from qlora_dist.tiny import build_tiny_model, train_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = train_tokenizer(texts, tmp, vocab_size=tokenizer_vocab)
    build_tiny_model(
        tmp,
        tokenizer,
        arch="llama",
        hidden_size=shape.hidden_size,
        layers=shape.layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        dtype=getattr(torch, dtype),
        device="cuda" if torch.cuda.is_available() else "cpu",
        **({"vocab_size": shape.vocab_size} if shape.vocab_size else {}),
    )
    os.replace(tmp, folder)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
    return folder


def machine() -> str:
    """CPU model, cores, memory and library versions, in one line."""
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, accelerate {accelerate.__version__}"
    )


def write_section(path: Path, section: str) -> None:
    """Replace (or add) the section of ``path`` whose title is ``section``'s first line, leaving every other
    section alone."""
    title = section.splitlines()[0].strip()
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    span = _section_span(lines, title)
    if span is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        start, end = span
        tail = "\n".join(lines[end:])
        new = "\n".join(lines[:start]) + "\n" + section.rstrip("\n") + "\n" + ("\n" + tail + "\n" if tail else "")
    path.write_text(new, encoding="utf-8")


def write_subsections(path: Path, section: str) -> None:
    """Replace, in the section of ``path`` titled by ``section``'s first line, only the ``### `` subsections
    that ``section`` holds (matched by their titles up to the first colon), keeping the section's other lines:
    a partial rerun (``--only``) must not drop the tables it did not measure."""
    title = section.splitlines()[0].strip()
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    span = _section_span(lines, title)
    if span is None:
        return write_section(path, section)
    start, end = span
    new = _blocks(section.splitlines())
    old = _blocks(lines[start:end])
    kept = [new.pop(key) if key in new else block for key, block in old.items()]
    body = [line for block in kept + list(new.values()) for line in _trimmed(block) + [""]]
    path.write_text("\n".join(lines[:start] + body + lines[end:]).rstrip("\n") + "\n", encoding="utf-8")


def _section_span(lines: list[str], title: str) -> tuple[int, int] | None:
    """The lines ``[start, end)`` of the section titled ``title`` (up to the next ``## ``), or None."""
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        return None
    return start, next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))


def _trimmed(block: list[str]) -> list[str]:
    while block and not block[-1].strip():
        block = block[:-1]
    return block


def _blocks(lines: list[str]) -> dict[str, list[str]]:
    """The lines before the first ``### `` title (key ``""``), then each subsection, keyed by its title's start."""
    out: dict[str, list[str]] = {"": []}
    key = ""
    for line in lines:
        if line.startswith("### "):
            key = line.split(":")[0]
            out[key] = []
        out[key].append(line)
    return out


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the repository on ``PYTHONPATH`` (children run ``python -m benchmarks.*``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
