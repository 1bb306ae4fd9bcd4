"""The chunked next-token loss equals the full-logit loss, in value and in LoRA gradients, and holds less.

Models are tiny (hidden 64, 2 layers) and built in memory from their configs; one Llama is loaded in NF4 from
a saved checkpoint, as a run loads it. Everything runs in float32 on the CPU, where the chunked path performs
the same row-wise operations as the full one: the tolerances (1e-5 relative) only absorb a different
summation order of the per-chunk loss sums.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig, Qwen2Config

from benchmarks.common import TINY_LLAMA
from qlora_dist import loss as loss_mod
from qlora_dist.data import collate, pack_examples
from qlora_dist.loss import token_loss_sum

from .test_plan import LiveBytes

VOCAB = 320
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, **TINY_LLAMA.config_kwargs())  # hidden 64, 2 layers
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    # Tied embeddings and a final-logit soft-cap small enough to bend these logits (random init gives ~0.5).
    "gemma2_tied_softcap": lambda: Gemma2Config(
        **_COMMON, head_dim=16, tie_word_embeddings=True, final_logit_softcapping=0.5, attn_implementation="eager"
    ),
    "qwen2": lambda: Qwen2Config(**_COMMON, use_sliding_window=False),
    # A final-logit scale: multiplied (Cohere's logit_scale) or divided (Granite's logits_scaling); values far
    # from 1 so a scale applied wrongly in the hand-written gradient shows.
    "cohere_scale": lambda: CohereConfig(**_COMMON, logit_scale=4.0, tie_word_embeddings=False),
    "granite_scale": lambda: GraniteConfig(**_COMMON, logits_scaling=0.25),
}


def lora_model(config, seed: int = 0):
    """A frozen random base with LoRA on every linear layer, B initialised non-zero (so gradients reach A)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(config)
        for p in base.parameters():
            p.requires_grad_(False)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def padded_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 24), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[0, :7] = -100  # a prompt
    labels[2, 17:], mask[2, 17:] = -100, 0  # padding
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    examples = []
    for n in (9, 13, 5, 11, 7):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return collate(pack_examples(examples, max_length=24), pad_id=0)


def loss_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    value = token_loss_sum(model, batch, chunk)
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(reference, candidate, rtol=1e-5):
    (loss0, grads0), (loss1, grads1) = reference, candidate
    assert loss1 == pytest.approx(loss0, rel=rtol)
    assert grads0.keys() == grads1.keys() and grads0
    for name, g0 in grads0.items():
        assert float(g0.abs().max()) > 0, name  # every LoRA weight gets a gradient: the test can fail
        torch.testing.assert_close(grads1[name], g0, rtol=rtol, atol=rtol * float(g0.abs().max()), msg=name)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_chunked_loss_equals_full_logits(arch, packed):
    model = lora_model(CONFIGS[arch]())
    batch = packed_batch() if packed else padded_batch()
    full = loss_and_grads(model, batch, None)
    for chunk in (0, 5):  # automatic (one chunk here), and chunks that split rows and sequences
        assert_same(full, loss_and_grads(model, batch, chunk))


@pytest.mark.parametrize("arch", ["llama", "gemma2_tied_softcap"])
def test_chunked_loss_in_bfloat16(arch):
    """bfloat16 models (how GPUs train): the model rounds its logits to bfloat16 before the loss upcasts them,
    and the chunked loss rounds them the same way; its gradient through the head is taken in float32 where
    autograd works in bfloat16, so the two agree to bfloat16's precision, not to the last bit."""
    model = lora_model(CONFIGS[arch]()).to(torch.bfloat16)
    batch = padded_batch()
    (loss0, grads0), (loss1, grads1) = loss_and_grads(model, batch, None), loss_and_grads(model, batch, 5)
    assert loss1 == pytest.approx(loss0, rel=1e-3)
    for name, g0 in grads0.items():
        g0, g1 = g0.float().flatten(), grads1[name].float().flatten()
        assert float(g0.abs().max()) > 0, name
        assert float(torch.nn.functional.cosine_similarity(g0, g1, dim=0)) > 0.999, name


def test_chunked_loss_on_an_nf4_base(tiny_llama_dir):
    """The run's own loading path: NF4 base from a checkpoint, peft LoRA, gradient checkpointing."""
    from qlora_dist.config import LoraConfig as RunLora
    from qlora_dist.config import ModelConfig, QuantConfig
    from qlora_dist.model import attach_lora, enable_gradient_checkpointing, load_quantized_model

    base = load_quantized_model(ModelConfig(str(tiny_llama_dir)), QuantConfig(), torch.device("cpu"), torch.float32)
    enable_gradient_checkpointing(base)
    model = attach_lora(base, RunLora(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    model.train()
    batch = padded_batch()
    batch["input_ids"] %= model.config.vocab_size
    batch["labels"] = batch["labels"].where(batch["labels"] < 0, batch["labels"] % model.config.vocab_size)
    assert_same(loss_and_grads(model, batch, None), loss_and_grads(model, batch, 7))


def test_eval_mode_value_without_grad():
    model = lora_model(CONFIGS["gemma2_tied_softcap"]()).eval()
    batch = padded_batch()
    with torch.no_grad():
        assert float(token_loss_sum(model, batch, 4)) == pytest.approx(float(token_loss_sum(model, batch, None)))


def test_a_head_applied_differently_from_the_model_is_refused(monkeypatch):
    """The check against the model's own last-position logits: forgetting Gemma 2's soft-cap would train on
    another loss; it raises instead."""
    model = lora_model(CONFIGS["gemma2_tied_softcap"]())
    real_of = loss_mod.HeadSpec.of.__func__

    def without_softcap(cls, m):
        spec = real_of(cls, m)
        spec.softcap = None
        return spec

    monkeypatch.setattr(loss_mod.HeadSpec, "of", classmethod(without_softcap))
    with pytest.raises(RuntimeError, match="different logits than the model"):
        token_loss_sum(model, padded_batch(), 0)


def test_a_trained_head_falls_back_to_full_logits():
    model = lora_model(CONFIGS["llama"]())
    model.get_output_embeddings().weight.requires_grad_(True)
    assert loss_mod.HeadSpec.of(model) is None
    value, grads = loss_and_grads(model, padded_batch(), 0)
    assert any("lm_head" in n for n in grads)


def test_loss_memory_is_one_chunk_not_all_logits():
    """Peak bytes allocated by forward + backward, with a vocabulary large enough that logits dominate:
    the full path holds several tokens x vocabulary float32 tensors, the chunked one a chunk's worth."""
    vocab, tokens = 16384, 2 * 256
    model = lora_model(LlamaConfig(**{**_COMMON, "vocab_size": vocab}))
    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    peaks = {}
    for chunk in (None, 64):
        model.zero_grad(set_to_none=True)
        with LiveBytes(set(known)) as tracker:
            token_loss_sum(model, batch, chunk).backward()
        peaks[chunk] = tracker.peak
    logits_bytes, chunk_bytes = tokens * vocab * 4, 64 * vocab * 4
    assert peaks[None] > 2 * logits_bytes, peaks  # the full path: logits, log-softmax, their gradient
    # The chunked path: about three chunk-sized float32 tensors, plus the (small) rest of the model's activations.
    assert peaks[64] < 5 * chunk_bytes and peaks[64] < 0.25 * peaks[None], peaks
