"""Where an optimizer step's examples go: over ranks and micro-batches by cost, not by count
(``data.balance_tokens``).

Padded batches make a rank pay for its longest row on every row of a micro-batch, so with a count split the
rank that drew the long example computes while the others wait in the gradient all-reduce. :func:`split_by_tokens`
places the step's examples (always the same ones: the contract resume and 2 x b == 1 x 2b rest on) so that
every rank's predicted work is about equal, and every rank runs the same number of micro-batches (FSDP2 and
ZeRO run collectives in every forward). The prediction is :class:`StepCost`, from the model's config: FLOP
counts, not timings, so that every rank and every resumed run computes exactly the same placement.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, combinations
from typing import Any

_SWEEPS = 8
"""Boundary-evening passes over the runs (alternating direction): a few do most of it, and every rank runs
them every step."""

_EXHAUSTIVE = 1000
"""Try every cut when there are at most this many (up to a few milliseconds)."""

_MARGIN = 0.05
"""Twice the micro-batches only when the predicted step is at least this much shorter: the prediction is FLOPs,
and a micro-batch call has costs FLOPs miss (kernel launches, the 4-bit weights dequantized per call)."""


_CPU_BODY_SLOWDOWN = 1.7
"""bitsandbytes 0.50's 4-bit CPU matmul against float32 attention and head, per FLOP. A 2-layer, 256-wide Llama
(vocabulary 4,096), 158 micro-batches of the bench data (1-4 rows, 200-1,024 tokens) timed one by one: a
least-squares fit put a labelled token at 0.32 of a padded one (FLOPs: 0.59, so 1.85x) and attention per
position at 5.8e-4 (FLOPs: 8.7e-4, 1.5x)."""

_CPU_OVERHEAD = 32.0
"""A micro-batch's fixed cost on CPU, in padded tokens (the same fit: 8; one on synthetic shapes of 1-16 rows:
48). The CUDA default, 256, is an estimate: one 4-bit dequantization of every weight per pass, memory-bound,
against 6 FLOPs per weight per token at the GPU's matmul rate, plus kernel launches."""


@dataclass(frozen=True)
class StepCost:
    """Predicted work of a micro-batch, in padded tokens of the decoder body.

    ``rows x longest`` tokens pass through every layer (padding included), each attending over ``longest``
    positions (``attention`` per position), the ``labelled`` ones then through the output head and the loss
    (the chunked loss computes logits for those only), and each micro-batch costs ``overhead`` tokens' worth
    more (one more pass over every layer's weights: the 4-bit weights are dequantized per call). Only ratios
    matter. The default counts padded tokens only, plus the overhead.
    """

    attention: float = 0.0
    labelled: float = 0.0
    overhead: float = 256.0

    def of(self, rows: int, longest: int, labelled: int) -> float:
        return rows * longest * (1.0 + self.attention * longest) + self.labelled * labelled + self.overhead

    @classmethod
    def of_config(cls, config: Any, device_type: str = "cuda") -> StepCost:
        """From a transformers config (its text config for a multimodal one): FLOPs per token of the body's
        matmuls (forward, recompute under gradient checkpointing, input gradients: 3 x 2 FLOPs per weight),
        of attention per position, and of the head (logits and their gradient: 2 x 2 per head weight). A
        config without the usual fields gets the default (padded tokens only).

        On CUDA bitsandbytes dequantizes a 4-bit weight and runs the ordinary GEMM, so a FLOP costs about the
        same in the body as in the head; its CPU kernels are slower per FLOP than the 16/32-bit head and
        attention (measured: :data:`_CPU_BODY_SLOWDOWN`), and a micro-batch's fixed cost is smaller there."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, layers, heads, vocab = (
            getattr(text, name, None)
            for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        )
        if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
            return cls()
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        # MoE: the experts a token is routed to (and a shared expert) count, not all of them.
        inner = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", None)
        inner = inner or getattr(text, "n_inner", None) or 4 * hidden
        inner = inner * (getattr(text, "num_experts_per_tok", None) or 1)
        inner += getattr(text, "shared_expert_intermediate_size", None) or 0
        per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inner
        body = 6 * layers * per_layer * (_CPU_BODY_SLOWDOWN if device_type == "cpu" else 1.0)
        return cls(
            attention=12 * layers * heads * head_dim / body,
            labelled=4 * hidden * vocab / body,
            overhead=_CPU_OVERHEAD if device_type == "cpu" else cls.overhead,
        )


def split_by_tokens(
    block: Sequence[int],
    lengths: Sequence[int],
    world_size: int,
    grad_accum: int,
    labelled: Sequence[int] | None = None,
    cost: StepCost | None = None,
) -> list[list[list[int]]]:
    """``[rank][micro-batch] -> example indices`` for one optimizer step's ``block`` (its length a multiple of
    ``world_size``), so that the ranks' predicted work (``cost`` of each micro-batch: its rows x longest row,
    attention, ``labelled`` tokens per example) is about equal: no rank waits long in the gradient all-reduce.

    Every rank runs the same number of micro-batches, none empty: ``min(grad_accum, len(block) / world_size)``,
    or, on more than one rank, twice that when the prediction says the step gets at least 5% shorter. Small steps need it: with one
    micro-batch per rank, a rank holding the long example pays rows x its length, and no choice of rows can
    even that out; two let it put the long example apart. How many examples a rank takes is free.

    The examples, longest first, are cut into contiguous runs (similar lengths together: little padding), with
    the costliest run as cheap as it can be (a binary search on it, filling greedily), its boundaries then
    evened out; each rank takes as many runs, the costliest first to the rank with the least work. No
    micro-batch pads to more tokens than the count split's can (its rows of the block's longest example), so
    memory stays within the plan. A pure function of its arguments (ties go to the earlier run and the lower
    rank).
    """
    ordered = sorted(block, key=lambda i: (-lengths[i], i))
    per_rank = len(ordered) // world_size
    if per_rank * world_size != len(ordered) or not ordered:
        raise ValueError(f"a block of {len(ordered)} examples does not split over {world_size} ranks")
    bins = min(grad_accum, per_rank)
    runs = _Runs(
        ordered, lengths, labelled, cost or StepCost(), bound=math.ceil(per_rank / bins) * max(1, lengths[ordered[0]])
    )
    best, best_span = runs.place(world_size, bins)
    if world_size > 1 and 2 * bins <= per_rank:  # (one process waits for nobody: it keeps its micro-batches)
        finer, span = runs.place(world_size, 2 * bins)
        if span < (1 - _MARGIN) * best_span:
            best = finer
    return best


class _Runs:
    """Contiguous runs ``(i, j)`` of the sorted examples and what each costs (each pads to its first row)."""

    def __init__(self, ordered, lengths, labelled, cost: StepCost, bound: int):
        self.ordered, self.cost, self.bound = ordered, cost, bound
        self.size = [max(1, lengths[i]) for i in ordered]
        counts = self.size if labelled is None else [labelled[i] for i in ordered]
        self.labelled = [0, *accumulate(counts)]

    def of(self, i: int, j: int) -> float:
        return self.cost.of(j - i, self.size[i], self.labelled[j] - self.labelled[i])

    def fits(self, i: int, j: int) -> bool:
        return (j - i) * self.size[i] <= self.bound

    def cut(self, limit: float) -> list[tuple[int, int]]:
        """Greedy: each run as long as it fits ``limit`` and the memory bound (at least one row)."""
        out, i, n = [], 0, len(self.size)
        while i < n:
            low, high = i + 1, min(n, i + max(1, self.bound // self.size[i]))
            while low < high:  # the last end whose cost is within the limit (cost grows with the end)
                mid = (low + high + 1) // 2
                low, high = (mid, high) if self.of(i, mid) <= limit else (low, mid - 1)
            out.append((i, low))
            i = low
        return out

    def place(self, world_size: int, bins: int) -> tuple[list[list[list[int]]], float]:
        """``bins`` runs per rank, and the predicted work of the busiest rank."""
        wanted = world_size * bins
        if math.comb(len(self.size) - 1, wanted - 1) <= _EXHAUSTIVE:
            return self._place_exhaustively(world_size, bins)
        # Without a cost limit the runs already fit in `wanted` (the count split's micro-batches do).
        low, high = 0.0, max(self.of(a, b) for a, b in self.cut(math.inf))
        for _ in range(40):
            if high - low <= 1e-4 * high:
                break
            mid = (low + high) / 2
            low, high = (low, mid) if len(self.cut(mid)) <= wanted else (mid, high)
        runs = self._split_to(self.cut(high), wanted)
        self._even(runs)
        owner = self._assign(runs, world_size, bins)
        self._even(runs, owner, world_size)
        return self._placed(runs, owner, world_size)

    def _place_exhaustively(self, world_size: int, bins: int) -> tuple[list[list[list[int]]], float]:
        """Every way to cut the examples into ``world_size x bins`` runs (few examples per step: the heuristic's
        granularity matters most there, and there are few ways)."""
        n, best, best_span = len(self.size), None, math.inf
        for cuts in combinations(range(1, n), world_size * bins - 1):
            ends = (0, *cuts, n)
            runs = list(zip(ends[:-1], ends[1:], strict=True))
            if all(self.fits(a, b) for a, b in runs):
                owner = self._assign(runs, world_size, bins)
                placed, span = self._placed(runs, owner, world_size)
                if span < best_span:
                    best, best_span = placed, span
        assert best is not None  # the count split's cut fits the bound
        return best, best_span

    def _placed(self, runs, owner, world_size: int) -> tuple[list[list[list[int]]], float]:
        out: list[list[list[int]]] = [[] for _ in range(world_size)]
        work = [0.0] * world_size
        for run, r in sorted(zip(runs, owner, strict=True), key=lambda x: (-self.of(*x[0]), x[0])):
            out[r].append(self.ordered[run[0] : run[1]])
            work[r] += self.of(*run)
        return out, max(work)

    def _split_to(self, runs: list[tuple[int, int]], wanted: int) -> list[tuple[int, int]]:
        """Fewer runs than wanted (few examples): halve the costliest run of two or more rows until enough."""
        heap = [(-self.of(a, b), (a, b)) for a, b in runs if b - a > 1]
        heapq.heapify(heap)
        singles = [run for run in runs if run[1] - run[0] == 1]
        while len(heap) + len(singles) < wanted:
            _, (a, b) = heapq.heappop(heap)
            for half in ((a, (a + b) // 2), ((a + b) // 2, b)):
                (heapq.heappush(heap, (-self.of(*half), half)) if half[1] - half[0] > 1 else singles.append(half))
        return sorted([run for _, run in heap] + singles)

    def _assign(self, runs, world_size: int, bins: int) -> list[int]:
        """The rank of each run: costliest first, to the rank with the least work and room for another."""
        owner = [0] * len(runs)
        open_ranks = [(0.0, r) for r in range(world_size)]  # (work so far, rank) of ranks with room for a run
        count = [0] * world_size
        for k in sorted(range(len(runs)), key=lambda k: (-self.of(*runs[k]), k)):
            total, r = heapq.heappop(open_ranks)
            owner[k], count[r] = r, count[r] + 1
            if count[r] < bins:
                heapq.heappush(open_ranks, (total + self.of(*runs[k]), r))
        return owner

    def _even(self, runs: list[tuple[int, int]], owner: list[int] | None = None, world_size: int = 0) -> None:
        """Move each boundary between neighbouring runs to where the busier side is least busy. Without
        ``owner`` the sides are the two runs (the greedy cut leaves the last runs short); with it, the two
        runs' ranks and all their work (runs of one rank are skipped). The left side's work grows with the
        boundary and the right one's falls, so the best boundary is where they cross: a binary search, within
        the memory bound."""
        work = [0.0] * world_size
        for run, r in zip(runs, owner or (), strict=False):
            work[r] += self.of(*run)
        for sweep in range(_SWEEPS):
            moved = False
            for j in range(len(runs) - 1) if sweep % 2 == 0 else range(len(runs) - 2, -1, -1):
                (a, m), (_, b) = runs[j], runs[j + 1]
                rest_p = rest_q = 0.0  # the sides' other work
                if owner is not None:
                    p, q = owner[j], owner[j + 1]
                    if p == q:
                        continue
                    rest_p, rest_q = work[p] - self.of(a, m), work[q] - self.of(m, b)

                def busier(x: int, rest_p: float = rest_p, rest_q: float = rest_q, a: int = a, b: int = b) -> float:
                    return max(rest_p + self.of(a, x), rest_q + self.of(x, b))

                low, high = a + 1, b - 1
                while low < high:  # the first boundary where the left side has at least the right one's work
                    mid = (low + high) // 2
                    low, high = (mid + 1, high) if rest_p + self.of(a, mid) < rest_q + self.of(mid, b) else (low, mid)
                best = min(
                    (x for x in (low - 1, low) if a < x < b and self.fits(a, x) and self.fits(x, b)),
                    key=lambda x: (busier(x), abs(x - m)),
                    default=m,
                )
                if busier(best) < busier(m):
                    runs[j], runs[j + 1], moved = (a, best), (best, b), True
                    if owner is not None:
                        work[p], work[q] = rest_p + self.of(a, best), rest_q + self.of(best, b)
            if not moved:
                break
