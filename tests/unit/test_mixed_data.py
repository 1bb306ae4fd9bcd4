"""Several data sets in one run (``data.datasets``): per-source formats, weights, counts, config errors, ``check``.

The mixture is one tokenized data set, so the global-order contract (exact resume, 2 ranks x b == 1 rank x 2b)
is the one-file contract; ``tests/distributed/test_library_own_loop.py`` checks both on a mixed run.
"""

from __future__ import annotations

from collections import Counter

import pytest

from qlora_dist.config import load_config
from qlora_dist.data import prepare_sources, rank_indices, weighted_pick
from qlora_dist.errors import ConfigError, DataError


def mixed(demo_data_dir, **data):
    sources = [
        {"path": str(demo_data_dir / "alpaca_demo.jsonl"), "format": "alpaca", "weight": 0.5},
        {"path": str(demo_data_dir / "completion_demo.jsonl"), "weight": 2},  # format auto: completion
    ]
    base = {"model": {"name_or_path": "x"}, "data": {"datasets": sources, "max_length": 64, **data}}
    return load_config(base=base).data


@pytest.mark.parametrize("weight", [0.25, 1.0, 1.5, 3.0])
def test_weighted_pick_counts_and_is_a_pure_function(weight):
    picked = weighted_pick(40, weight, seed=3, source=1)
    assert len(picked) == int(weight) * 40 + round((weight - int(weight)) * 40)
    assert picked == weighted_pick(40, weight, seed=3, source=1)
    counts = Counter(picked)
    assert set(counts.values()) <= {int(weight), int(weight) + 1} - {0} and set(counts) <= set(range(40))
    if weight >= 1:
        assert set(counts) == set(range(40))  # every example at least floor(weight) times
    assert weighted_pick(40, 0.5, seed=3, source=1) != weighted_pick(40, 0.5, seed=3, source=2)


def test_mixture_counts_formats_and_sources(tiny_tokenizer, demo_data_dir, tmp_path):
    cfg = mixed(demo_data_dir, eval_fraction=0.1)
    train, held_out, sources = prepare_sources(cfg, tiny_tokenizer, 7, tmp_path, True, lambda: None)
    assert [s["format"] for s in sources] == ["alpaca", "completion"]
    a, c = sources
    assert a["train_examples"] == round(a["examples"] * 0.5) and c["train_examples"] == 2 * c["examples"]
    assert len(train) == a["train_examples"] + c["train_examples"]
    assert Counter(train["source"]) == {0: a["train_examples"], 1: c["train_examples"]}
    assert held_out is not None and len(held_out) == a["eval_examples"] + c["eval_examples"]
    assert a["eval_examples"] > 0 and c["eval_examples"] > 0  # each source holds out its own share
    # Cached: the same data sets and counts come back without tokenizing again.
    again = prepare_sources(cfg, tiny_tokenizer, 7, tmp_path, True, lambda: None)
    assert again[2] == sources and again[0]["input_ids"] == train["input_ids"]
    # Another weight is another mixture (another cache entry).
    cfg.datasets[1].weight = 1.0
    other = prepare_sources(cfg, tiny_tokenizer, 7, tmp_path, True, lambda: None)
    assert other[2][1]["train_examples"] == c["examples"] and len(other[0]) < len(train)


def test_mixture_keeps_the_global_order_contract(tiny_tokenizer, demo_data_dir, tmp_path):
    train, _, _ = prepare_sources(mixed(demo_data_dir), tiny_tokenizer, 7, tmp_path, True, lambda: None)
    n = len(train)
    one = rank_indices(n, 7, 0, 0, 1)
    two = [rank_indices(n, 7, 0, r, 2) for r in range(2)]
    # 2 ranks x b == 1 rank x 2b: step k of the single process holds exactly the two ranks' step k.
    b = 4
    for k in range(5):
        assert sorted(one[2 * b * k : 2 * b * (k + 1)]) == sorted(
            two[0][b * k : b * (k + 1)] + two[1][b * k : b * (k + 1)]
        )
    # Exact resume: from position p, the rest of the order is the uninterrupted order's rest.
    assert rank_indices(n, 7, 0, 0, 1, start=24) == one[24 : 24 + len(rank_indices(n, 7, 0, 0, 1, start=24))]


def test_bad_source_is_named(tiny_tokenizer, demo_data_dir, tmp_path):
    cfg = mixed(demo_data_dir)
    cfg.datasets[1].format = "alpaca"  # the completion file has no instruction/output columns
    with pytest.raises(DataError, match="completion_demo.jsonl: data.format=alpaca needs the column"):
        prepare_sources(cfg, tiny_tokenizer, 7, tmp_path, True, lambda: None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"path": "a.jsonl", "datasets": [{"path": "b.jsonl"}]}, "data.path and data.datasets are both set"),
        ({"datasets": [{"format": "alpaca"}]}, r"data.datasets\[0\].path is required"),
        ({"datasets": [{"path": "a.jsonl", "weight": 0}]}, r"data.datasets\[0\].weight=0.0 is out of range"),
        ({"datasets": [{"path": "a.jsonl", "format": "chatml"}]}, r"data.datasets\[0\].format='chatml' is not allowed"),
        ({"datasets": [{"path": "a.jsonl", "wieght": 2}]}, r"unknown key data.datasets\[0\].wieght"),
        ({"datasets": "a.jsonl"}, "data.datasets must be a list of mappings"),
    ],
)
def test_config_errors_name_the_source(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(base={"model": {"name_or_path": "x"}, "data": data})


def test_check_validates_every_source(tiny_llama_dir, demo_data_dir, tmp_path):
    from qlora_dist.doctor import run_checks

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    sources = [{"path": str(demo_data_dir / "alpaca_demo.jsonl"), "weight": 2}, {"path": str(bad), "format": "alpaca"}]
    base = {"model": {"name_or_path": str(tiny_llama_dir)}, "data": {"datasets": sources}}
    (tmp_path / "run.yaml").write_text("{}\n")
    data = {f.check: f for f in run_checks(None, [], config=load_config(base=base))}["data"]
    assert data.level == "error" and f"{bad}, line 2" in data.message and "'output'" in data.message
    base["data"]["datasets"] = sources[:1] + [{"path": str(demo_data_dir / "text_demo.jsonl")}]
    data = {f.check: f for f in run_checks(None, [], config=load_config(base=base))}["data"]
    assert data.level == "ok" and "alpaca format, weight 2" in data.message and "text format" in data.message


def test_one_weighted_source_is_weighted(tiny_tokenizer, demo_data_dir, tmp_path):
    cfg = mixed(demo_data_dir)
    cfg.datasets = cfg.datasets[1:]  # the completion file alone, weight 2
    train, _, (only,) = prepare_sources(cfg, tiny_tokenizer, 7, tmp_path, True, lambda: None)
    assert only["train_examples"] == 2 * only["examples"] == len(train)
