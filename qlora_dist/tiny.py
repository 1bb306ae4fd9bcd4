"""Tiny, locally built tokenizers and models for the demo and the tests (nothing is downloaded).

- :func:`train_tokenizer` trains a byte-level BPE tokenizer (the `tokenizers` library) with bos/eos/pad and a
  small chat template, and saves it with ``save_pretrained`` so ``AutoTokenizer`` loads it back.
- :func:`build_tiny_model` builds a randomly initialised causal LM (Llama, Qwen2, or one of :data:`FAMILIES`) (``from_config``) whose
  vocabulary and special ids match that tokenizer, and saves it (safetensors) with the tokenizer beside it.
- :func:`demo_texts` yields every string in ``examples/data/*.jsonl``, the corpus the demo tokenizer is
  trained on.
- :func:`pretrain_tiny_model` gives a built model some "pretraining" (full training on plain text, a few
  seconds on a CPU), so that it behaves like a base model: LoRA on a *random* frozen base barely learns in
  a demo's few dozen steps, while on a base that knows the facts it learns the instruction format quickly.
  :func:`plain_texts` is such text: each demo alpaca example as one untemplated line.

Everything is deterministic: the same inputs and seed give the same files, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One special token opens each turn and eos closes it. Opening a turn with a special token (rather than, say,
# "assistant:\n") keeps the token ids prefix-stable: the text after a special token is tokenized on its own, so
# rendering a conversation up to the generation prompt yields a token prefix of the full rendering. The label
# masking in data.py relies on (and checks) that property. Unknown roles are rendered as plain text markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}{{ '<|' + message['role'] + '|>' }}"
    "{% else %}{{ '[' + message['role'] + ']' }}{% endif %}"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", {"head_dim": 16}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16}),
    "gpt_neox": ("gpt_neox", {}),
    "falcon": ("falcon", {}),
    "gpt2": ("gpt2", {"n_positions": 2048}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "qwen3_moe",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
}
"""More families :func:`build_tiny_model` builds, by transformers ``model_type``: (model_type, the settings that
keep the tiny shape valid: a head size of 16 where the family's default is 128/256, experts, ...)."""

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"


def demo_texts(data_dir: Path | None = None) -> Iterator[str]:
    """Every string found in ``data_dir/*.jsonl`` (default: the repo's ``examples/data``), in a fixed order.

    Strings nested in lists/dicts (chat ``messages``) are included; keys are not. The files are read in sorted
    name order so the tokenizer trained on them is reproducible.
    """
    folder = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"no *.jsonl demo data in {folder}: run examples/data/make_demo_data.py, or pass data_dir="
        )
    for file in files:
        with file.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield from _strings(json.loads(line))


def plain_texts(data_dir: Path | None = None) -> list[str]:
    """Each row of ``alpaca_demo.jsonl`` as one plain line, "instruction [input] output", with no template.

    Pretraining on these teaches a base model the facts and tasks, but not the ``### Instruction:`` /
    ``### Response:`` format of :func:`qlora_dist.data.alpaca_prompt`: that is left for the adapter to learn.
    """
    folder = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    lines = []
    with (folder / "alpaca_demo.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                lines.append(" ".join(x for x in (row["instruction"], row.get("input") or "", row["output"]) if x))
    return lines


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir`` (``save_pretrained``).

    Special tokens: ``<pad>`` (id 0), ``<s>`` (bos, 1), ``</s>`` (eos, 2) and the chat role markers. Encoding
    text adds bos in front, like Llama tokenizers do; the chat template adds bos itself, so chat renderings are
    tokenized without special tokens. ``vocab_size`` is an upper bound: a small corpus yields fewer merges.
    """
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    # Byte-level: every string is encodable (no unknown token), and decoding gives the exact text back.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=2048,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_model(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    **overrides: Any,
) -> PreTrainedModel:
    """Build a randomly initialised causal LM, save it (safetensors) and ``tokenizer`` to ``out_dir``; return it.

    ``arch`` is ``llama`` or ``qwen2`` (Qwen2 has biased q/k/v projections, which LoRA/merge code must handle),
    or one of :data:`FAMILIES` (the model-zoo test's families: GPT-2's Conv1D, Falcon, fused MoE experts, ...).
    The model has 4 attention heads and 2 key/value heads (grouped-query attention, as in real checkpoints).
    ``overrides`` go to the config class, e.g. ``tie_word_embeddings=True`` or ``num_attention_heads=2``.
    The weights depend only on ``seed`` (the global torch RNG is left untouched). ``dtype`` and ``device`` are
    where the weights are initialised and the dtype they are saved in: an 8B shape initialises in seconds on a GPU
    in bfloat16 and takes minutes on a CPU.
    """
    if arch not in _ARCHS and arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join([*_ARCHS, *FAMILIES])}")
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "qwen2":
        settings["use_sliding_window"] = False
    if arch in FAMILIES:
        model_type, family_settings = FAMILIES[arch]
        config = AutoConfig.for_model(model_type, **{**settings, **family_settings, **overrides})
    else:
        settings.update(overrides)
        config = _ARCHS[arch](**settings)
    # fork_rng: seed the init without changing the caller's global RNG state.
    on = torch.device(device)
    with torch.random.fork_rng(devices=[on.index or 0] if on.type == "cuda" else []), on:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def pretrain_tiny_model(
    model_dir: Path,
    texts: Sequence[str],
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """Fully train the model saved in ``model_dir`` on ``texts`` (next-token loss), save it back, return the losses.

    Batches are drawn at random (seeded) from ``texts``, each text being bos + text + eos. About 300 steps of
    batch 32 take ~6 s on 2 CPU cores for the hidden-128 demo model. Repeatable for the same inputs on the same
    machine; float reductions may differ across CPUs/thread counts, so bytes may differ across machines.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout, if the config has any
        for _ in range(steps):
            rows = [encoded[i] for i in torch.randint(len(encoded), (batch_size,), generator=gen).tolist()]
            width = max(map(len, rows))
            input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
            loss = model(
                input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels, use_cache=False
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.save_pretrained(model_dir)
    return losses
