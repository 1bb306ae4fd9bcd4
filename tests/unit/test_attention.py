"""The per-example attention packed runs use: same numbers as sdpa with its block-diagonal mask, and the
stock path for anything that is not a packed row."""

from __future__ import annotations

import pytest
import torch

from qlora_dist import attention
from qlora_dist.data import collate


def test_segments_follow_position_restarts_and_padding_joins_the_last_example():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert attention.segments(pos) == (((0, 3), (3, 5), (5, 9)), ((0, 9),))
    assert attention.segments(pos) is attention.segments(pos)  # read once per forward, not once per layer


def _models(model_dir):
    from transformers import AutoModelForCausalLM

    name = attention.register()
    load = lambda impl: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)  # noqa: E731
    return load("sdpa"), load(name)


def _packed_batch():
    rows = [
        {
            "input_ids": [5, 6, 7, 8, 9, 10, 11],
            "labels": [-100, 6, 7, -100, 9, 10, 11],
            "position_ids": [0, 1, 2, 0, 1, 2, 3],
        },
        {"input_ids": [12, 13, 14, 15], "labels": [-100, 13, -100, 15], "position_ids": [0, 1, 0, 1]},
    ]
    return collate(rows, pad_id=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_attention_matches_masked_sdpa_forward_and_backward(request, arch):
    reference, packed = _models(request.getfixturevalue(f"tiny_{arch}_dir"))
    batch = _packed_batch()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    outs = []
    for model in (reference, packed):
        logits = model(**inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        loss.backward()
        outs.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (ref_logits, ref_grad), (got_logits, got_grad) = outs
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert attention.segments(batch["position_ids"]) == (((0, 3), (3, 7)), ((0, 2), (2, 7)))


def test_packed_attention_runs_per_example(tiny_llama_dir, monkeypatch):
    """The packed path really calls the kernel once per example, without a mask (else it saves nothing)."""
    from transformers.integrations import sdpa_attention

    calls = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((query.shape[0], query.shape[2], attention_mask is None, kwargs.get("is_causal")))
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    _, packed = _models(tiny_llama_dir)
    batch = _packed_batch()
    packed(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    layers = packed.config.num_hidden_layers
    assert calls == [(1, 3, True, True), (1, 4, True, True), (1, 2, True, True), (1, 5, True, True)] * layers


def test_unpacked_batches_and_generation_take_the_stock_path(tiny_llama_dir):
    reference, packed = _models(tiny_llama_dir)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
    batch = collate(rows, pad_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(packed(**inputs).logits, reference(**inputs).logits, rtol=1e-4, atol=1e-5)
        prompt = torch.tensor([[5, 6, 7]])
        kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert packed.generate(prompt, **kwargs).tolist() == reference.generate(prompt, **kwargs).tolist()
