"""Length-grouped batching (``data.group_by_length``).

The grouped order must keep every invariant the distributed and resume tests rely on: a seeded permutation (each
example once per epoch), permuted in whole global batches (so 2 ranks x micro-batch b see what 1 rank x 2b sees,
and each optimizer step takes the next contiguous block of the order, which is all a resume needs), and it must
actually cut padding.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest

from qlora_dist.config import DataConfig, load_config
from qlora_dist.data import (
    GROUP_CHUNK_BATCHES,
    epoch_order,
    example_lengths,
    group_by_length,
    rank_indices,
    tokenize_example,
)
from qlora_dist.plugin import QLoRAPlugin

BENCH_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "bench" / "alpaca_varlen.jsonl"


def random_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 600) for _ in range(n)]


def steps_of(n, lengths, seed, epoch, world, micro, accum, start=0):
    """Per optimizer step, the micro-batches of every rank (what ``QLoRAPlugin.epoch_steps`` yields)."""
    global_batch = micro * accum * world
    shards = [rank_indices(n, seed, epoch, r, world, start, lengths, global_batch) for r in range(world)]
    micro_batches = [[s[i : i + micro] for i in range(0, len(s), micro)] for s in shards]
    return [
        [mb for r in range(world) for mb in micro_batches[r][k : k + accum]]
        for k in range(0, len(micro_batches[0]), accum)
    ]


def pad_fraction(lengths, steps) -> float:
    """Share of padding in the micro-batches (each padded to its longest row, as ``collate`` does)."""
    real = sum(lengths[i] for step in steps for mb in step for i in mb)
    padded = sum(len(mb) * max(lengths[i] for i in mb) for step in steps for mb in step)
    return 1 - real / padded


# ----------------------------------------------------------------------------------------------------------
# The order itself


@pytest.mark.parametrize(("n", "global_batch"), [(1, 1), (7, 3), (64, 8), (101, 6), (500, 16), (2000, 8)])
def test_every_example_exactly_once_per_epoch(n, global_batch):
    lengths = random_lengths(n)
    for epoch in range(3):
        assert sorted(epoch_order(n, 5, epoch, lengths, global_batch)) == list(range(n))


def test_a_pure_function_of_seed_epoch_lengths_and_global_batch():
    n, lengths = 300, random_lengths(300)
    order = epoch_order(n, 3, 0, lengths, 8)
    assert order == epoch_order(n, 3, 0, list(lengths), 8)
    assert order != epoch_order(n, 3, 1, lengths, 8)
    assert order != epoch_order(n, 4, 0, lengths, 8)
    assert order != epoch_order(n, 3, 0, random_lengths(300, seed=1), 8)
    # Without lengths the order is the plain shuffle: runs that do not group (and their checkpoints) are unchanged.
    assert epoch_order(n, 3, 0) == epoch_order(n, 3, 0, None, 8) != order
    assert rank_indices(n, 3, 0, 1, 2) == epoch_order(n, 3, 0)[1::2]


def test_whole_global_batches_are_permuted_within_chunks_of_the_shuffle():
    n, global_batch, chunk = 1003, 8, 5
    lengths = random_lengths(n)
    plain = epoch_order(n, 0, 2)
    grouped = group_by_length(plain, lengths, global_batch, 0, 2, chunk_batches=chunk)
    span = global_batch * chunk
    for begin in range(0, n, span):
        part = plain[begin : begin + span]
        assert set(grouped[begin : begin + span]) == set(part), "examples never leave their chunk"
        by_length = sorted(part, key=lambda i: -lengths[i])
        full = len(part) // global_batch
        blocks = {frozenset(by_length[j * global_batch : (j + 1) * global_batch]) for j in range(full)}
        for j in range(full):
            batch = grouped[begin + j * global_batch : begin + (j + 1) * global_batch]
            assert frozenset(batch) in blocks, "each global batch is a run of neighbours in length"
            assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        # A partial batch (only the epoch's last chunk can have one) stays at the end of its chunk.
        assert grouped[begin + full * global_batch : begin + len(part)] == by_length[full * global_batch :]
    assert n % span and n % global_batch, "the case has a partial chunk and a partial batch"


def test_long_batches_do_not_all_come_first():
    n, global_batch = 8 * GROUP_CHUNK_BATCHES, 8  # one chunk
    lengths = random_lengths(n)
    firsts = set()
    for epoch in range(4):
        order = epoch_order(n, 0, epoch, lengths, global_batch)
        longest = [max(lengths[i] for i in order[j : j + global_batch]) for j in range(0, n, global_batch)]
        assert longest != sorted(longest, reverse=True)
        firsts.add(longest.index(max(longest)))
    assert len(firsts) > 1, "the longest batch is not always at the same step"


def test_rejects_lengths_that_do_not_fit():
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        epoch_order(4, 0, 0, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="global_batch"):
        epoch_order(4, 0, 0, [1, 2, 3, 4], 0)


# ----------------------------------------------------------------------------------------------------------
# What the training loop relies on


@pytest.mark.parametrize(("micro", "accum"), [(1, 1), (2, 1), (3, 2), (2, 4)])
def test_two_ranks_batch_b_see_what_one_rank_batch_2b_sees(micro, accum):
    n, lengths = 203, random_lengths(203)
    two = steps_of(n, lengths, 7, 1, world=2, micro=micro, accum=accum)
    one = steps_of(n, lengths, 7, 1, world=1, micro=2 * micro, accum=accum)
    four = steps_of(n, lengths, 7, 1, world=4, micro=micro, accum=accum // 2) if accum % 2 == 0 else None
    full_steps = n // (2 * micro * accum)  # a last, partial step may differ: W ranks drop up to W-1 examples
    assert len(two) >= full_steps and len(one) >= full_steps
    for k in range(full_steps):
        assert {i for mb in two[k] for i in mb} == {i for mb in one[k] for i in mb}
        if four is not None:
            assert {i for mb in four[k] for i in mb} == {i for mb in one[k] for i in mb}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_step_takes_the_next_block_and_a_resume_needs_only_the_position(world):
    n, micro, accum = 157, 2, 2
    lengths = random_lengths(n)
    global_batch = micro * accum * world
    order = epoch_order(n, 11, 0, lengths, global_batch)
    steps = steps_of(n, lengths, 11, 0, world, micro, accum)
    used = n - n % world  # the ranks leave out the last n % world examples of the order
    for k, step in enumerate(steps):
        block = order[k * global_batch : min((k + 1) * global_batch, used)]
        assert sorted(i for mb in step for i in mb) == sorted(block)
    for k in range(len(steps)):
        start = k * global_batch
        for rank in range(world):
            resumed = rank_indices(n, 11, 0, rank, world, start, lengths, global_batch)
            assert resumed == rank_indices(n, 11, 0, rank, world, 0, lengths, global_batch)[start // world :]


def test_padding_drops_on_the_bundled_variable_length_data(tiny_tokenizer):
    rows = [json.loads(line) for line in BENCH_DATA.read_text().splitlines() if line.strip()]
    lengths = [len(tokenize_example(r, "alpaca", tiny_tokenizer, 1024)["input_ids"]) for r in rows]
    n = len(lengths)
    for world, micro, accum in [(2, 4, 1), (1, 8, 2)]:
        plain = pad_fraction(lengths, steps_of(n, None, 42, 0, world, micro, accum))
        grouped = pad_fraction(lengths, steps_of(n, lengths, 42, 0, world, micro, accum))
        print(f"world {world} micro {micro} accum {accum}: pad {plain:.1%} shuffled, {grouped:.1%} grouped")
        assert plain > 0.2, "the bundled data varies in length: random batches waste a lot"
        assert grouped < plain / 4


# ----------------------------------------------------------------------------------------------------------
# Wiring: config key, lengths from a dataset, QLoRAPlugin.epoch_steps


def test_config_key_defaults_off_and_loads(tmp_path):
    assert DataConfig().group_by_length is False
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d.jsonl}\n")
    assert load_config(path, ["data.group_by_length=true"]).data.group_by_length is True


def test_example_lengths_reads_arrow_and_follows_selections():
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * k for k in (3, 1, 4, 1, 5)]})
    assert example_lengths(ds) == [3, 1, 4, 1, 5]
    assert example_lengths(ds.select([4, 0])) == [5, 3]
    assert example_lengths([{"input_ids": [1, 2]}, {"input_ids": []}]) == [2, 0]


def _plugin(group: bool, micro: int, accum: int) -> QLoRAPlugin:
    return QLoRAPlugin.from_kwargs(
        model={"name_or_path": "unused"},
        data={"path": "unused.jsonl", "group_by_length": group},
        train={"micro_batch_size": micro, "grad_accum": accum, "seed": 3},
    )


def _dataset(n: int) -> datasets.Dataset:
    lengths = random_lengths(n, seed=2)
    ids = [[5] * k for k in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [[-100] + [5] * (k - 1) for k in lengths]})


def _plugin_steps(plugin, dataset, world):
    per_rank = [list(plugin.epoch_steps(dataset, 0, r, world, pad_id=0)) for r in range(world)]
    return [[b for r in range(world) for b in per_rank[r][k]] for k in range(len(per_rank[0]))]


def test_plugin_epoch_steps_groups_in_global_batches():
    dataset = _dataset(97)
    two = _plugin_steps(_plugin(True, 2, 2), dataset, world=2)
    one = _plugin_steps(_plugin(True, 4, 2), dataset, world=1)
    plain = _plugin_steps(_plugin(False, 2, 2), dataset, world=2)
    full_steps = len(dataset) // 8  # global batch 8: 2 ranks drop the 97th example, 1 rank ends on a partial step
    assert len(two) == len(plain) == full_steps == len(one) - 1
    for a, b in zip(two[:full_steps], one[:full_steps], strict=True):
        assert sorted(i for mb in a for i in mb["index"].tolist()) == sorted(
            i for mb in b for i in mb["index"].tolist()
        )

    def pad(steps):
        real = sum(int(mb["attention_mask"].sum()) for s in steps for mb in s)
        return 1 - real / sum(mb["input_ids"].numel() for s in steps for mb in s)

    assert pad(two) < pad(plain) / 3
    # Off, the plugin keeps the plain shuffle.
    assert sorted(i for mb in plain[0] for i in mb["index"].tolist()) == sorted(epoch_order(len(dataset), 3, 0)[:8])
