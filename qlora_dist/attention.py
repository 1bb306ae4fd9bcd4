"""Attention for packed rows that only computes what the mask would keep.

A packed row holds several examples one after the other, their position ids restarting at 0 for each. The
stock ``sdpa`` path gives the kernel a block-diagonal causal mask over the whole row, so the kernel still
computes every query/key block of the row and throws most of it away: for a row of ``L`` tokens holding
examples of lengths ``l_i`` it pays for ``L^2`` scores where ``sum(l_i^2)`` are needed. On a CPU that made
attention in packed rows cost about 3x per token and ate most of what packing saved on padding.

``PACKED_ATTENTION`` is the same scaled-dot-product attention (transformers' own ``sdpa_attention_forward``)
called once per example with ``is_causal=True`` and no mask, so each kernel call does exactly one example's
causal attention (the flash kernels, on GPU and CPU, skip the blocks above the diagonal). Examples are found
from ``position_ids``, which the model hands to every attention call. Anything that is not a packed row (no
position ids, decoding with a cache, rows of one sequence, a sliding window shorter than an example) goes to
the stock ``sdpa`` path with its mask, so the implementation is safe to leave on for evaluation and
generation.

Variable-length kernels (flash-attention's ``varlen``) would do the same without a Python loop, but they are
CUDA-only and transformers uses them for packed input only when the batch is a single row; this works for any
batch, on any device, with what torch already ships.
"""

from __future__ import annotations

import torch

PACKED_ATTENTION = "qlora_dist_packed_sdpa"
"""The ``attn_implementation`` name runs with ``data.packing`` load their model with."""

Segments = tuple[tuple[tuple[int, int], ...], ...]

_cache: tuple[torch.Tensor, Segments] | None = None
"""The last ``position_ids`` seen and its segments: every layer of one forward (and the recomputation under
gradient checkpointing) gets the same tensor, so the boundaries are read from the device once per forward."""


def register() -> str:
    """Make ``PACKED_ATTENTION`` a valid ``attn_implementation`` for transformers models; returns the name.

    Registering again is harmless. Its mask builder is sdpa's, so the fall-back path gets the mask it expects.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


def segments(position_ids: torch.Tensor) -> Segments:
    """``(start, end)`` spans of the examples in each row: a new one starts where a position does not follow
    its predecessor. Padding after the last example continues its positions, so it joins that example."""
    global _cache
    if _cache is not None and _cache[0] is position_ids:
        return _cache[1]
    pos = position_ids.detach().to("cpu", torch.long)
    width = pos.shape[1]
    breaks = pos[:, 1:] != pos[:, :-1] + 1
    spans = []
    for row in breaks:
        starts = [0, *(row.nonzero().flatten() + 1).tolist()]
        spans.append(tuple(zip(starts, [*starts[1:], width], strict=True)))
    result = tuple(spans)
    _cache = (position_ids, result)
    return result


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: ``(batch, heads, seq, dim)`` in, ``(batch, seq, heads, dim)``
    out, like ``sdpa_attention_forward``, which it calls per example when the rows are packed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    spans = _packed_spans(position_ids, query, key, kwargs.get("sliding_window"))
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    # The mask transformers built for these rows is the block-diagonal causal one; per-example causal
    # attention is exactly that, without computing the blocks it would mask out.
    kwargs.pop("is_causal", None)
    rows = []
    for b, row_spans in enumerate(spans):
        parts = [
            sdpa_attention_forward(
                module,
                query[b : b + 1, :, start:end],
                key[b : b + 1, :, start:end],
                value[b : b + 1, :, start:end],
                None,
                dropout,
                scaling,
                is_causal=True,
                **kwargs,
            )[0]
            for start, end in row_spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def _packed_spans(
    position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, sliding_window: int | None
) -> Segments | None:
    """The rows' example spans when this call is packed training/eval attention, else None (use the mask)."""
    if position_ids is None or position_ids.dim() != 2:
        return None
    width = query.shape[2]
    # Decoding (one query against a cache) or a key length other than the query's: not a packed row.
    if width <= 1 or key.shape[2] != width or position_ids.shape != (query.shape[0], width):
        return None
    spans = segments(position_ids)
    if all(len(row) == 1 for row in spans):
        return None
    if sliding_window and any(end - start > sliding_window for row in spans for start, end in row):
        return None
    return spans
