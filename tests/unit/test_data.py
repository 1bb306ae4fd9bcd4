"""CPU tests of qlora_dist.data (formats, label masks, errors, split, cache, sharding, collation, packing)
and of the tiny builders in qlora_dist.tiny that every other test relies on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from qlora_dist import data
from qlora_dist.config import DataConfig
from qlora_dist.data import (
    IGNORE_INDEX,
    collate,
    detect_format,
    epoch_order,
    load_rows,
    pack_examples,
    prepare_datasets,
    rank_indices,
    tokenize_example,
)
from qlora_dist.errors import DataError

EOS = "</s>"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_text(tokenizer, example: dict) -> str:
    ids = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


def labelled_spans(example: dict) -> list[tuple[int, int]]:
    """Maximal runs of positions that carry a label."""
    spans, start = [], None
    for i, label in enumerate([*example["labels"], IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def prepare(cfg: DataConfig, tokenizer, cache_dir: Path, seed: int = 0, main: bool = True, barrier=lambda: None):
    return prepare_datasets(cfg, tokenizer, seed, cache_dir, is_main_process=main, wait_for_everyone=barrier)


# ----------------------------------------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages"], "chat"),
        (["messages", "text"], "chat"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["prompt", "completion"], "completion"),
        (["text"], "text"),
        (["text", "id", "source"], "text"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_error_lists_found_and_needed_columns():
    with pytest.raises(DataError) as e:
        detect_format(["question", "answer"])
    msg = str(e.value)
    for needle in ("answer", "question", "messages", "instruction + output", "prompt + completion", "text"):
        assert needle in msg


# ----------------------------------------------------------------------------------------------------------
# Label masks per format


@pytest.mark.parametrize(
    ("fmt", "row", "learned"),
    [
        ("alpaca", {"instruction": "What is the capital of Peru?", "input": "", "output": "Lima."}, "Lima."),
        ("alpaca", {"instruction": "Give the opposite.", "input": "hot", "output": "cold"}, "cold"),
        ("alpaca", {"instruction": "Say hi.", "output": "hi"}, "hi"),  # no input column at all
        ("completion", {"prompt": "The capital of Peru is", "completion": " Lima."}, " Lima."),
        ("text", {"text": "Oslo is the capital of Norway."}, "Oslo is the capital of Norway."),
    ],
)
def test_loss_only_on_the_answer(tiny_tokenizer, fmt, row, learned):
    ex = tokenize_example(row, fmt, tiny_tokenizer, max_length=512)
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert labelled_text(tiny_tokenizer, ex) == learned + EOS
    assert len(labelled_spans(ex)) == 1, "the answer is one contiguous span at the end"
    assert labelled_spans(ex)[0][1] == len(ex["input_ids"])
    assert ex["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert ex["labels"][0] == IGNORE_INDEX  # the first token is never a target
    for token, label in zip(ex["input_ids"], ex["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)


def test_alpaca_prompt_holds_instruction_and_input(tiny_tokenizer):
    ex = tokenize_example(
        {"instruction": "Give the opposite.", "input": "hot", "output": "cold"}, "alpaca", tiny_tokenizer, 512
    )
    prompt = tiny_tokenizer.decode(ex["input_ids"], skip_special_tokens=True)
    assert prompt == data.alpaca_prompt("Give the opposite.", "hot") + "cold"


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "And of Chile?"},
        {"role": "assistant", "content": "Santiago."},
    ],
    [  # ends with a user turn: nothing after the last assistant turn is learned
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_loss_only_on_assistant_turns(tiny_tokenizer, messages):
    ex = tokenize_example({"messages": messages}, "chat", tiny_tokenizer, max_length=512)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert labelled_text(tiny_tokenizer, ex) == "".join(a + EOS for a in assistant)
    spans = labelled_spans(ex)
    assert len(spans) == len(assistant), "every assistant turn is learned, each as its own span"
    for (start, end), content in zip(spans, assistant, strict=True):
        assert tiny_tokenizer.decode(ex["input_ids"][start:end]) == content + EOS
    # The whole conversation is there, rendered by the template.
    assert (
        ex["input_ids"]
        == tiny_tokenizer(tiny_tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )


def test_chat_demo_file_masks_every_assistant_turn(tiny_tokenizer, demo_data_dir):
    for line in (demo_data_dir / "chat_demo.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        ex = tokenize_example({"messages": messages}, "chat", tiny_tokenizer, max_length=1024)
        learned = labelled_text(tiny_tokenizer, ex)
        assert learned == "".join(m["content"] + EOS for m in messages if m["role"] == "assistant")


def test_chat_without_template_says_how_to_fix(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"tokenizer at .* has no chat template.*completion or alpaca"):
        tokenize_example({"messages": CONVERSATIONS[0]}, "chat", tok, 64)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(DataError, match="has no chat template"):
        prepare(DataConfig(path=str(path)), tok, tmp_path / "cache")


def test_chat_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # Marks the last message differently, so a partial rendering is not a prefix of the full one.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [last]{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_example({"messages": CONVERSATIONS[1]}, "chat", tok, 512)


def test_truncation(tiny_tokenizer):
    row = {"text": " ".join(["Paris is the capital of France."] * 20)}
    full = tokenize_example(row, "text", tiny_tokenizer, max_length=10_000)
    cut = tokenize_example(row, "text", tiny_tokenizer, max_length=16)
    assert len(full["input_ids"]) > 16
    assert cut["input_ids"] == full["input_ids"][:16]
    assert cut["labels"] == full["labels"][:16]


# ----------------------------------------------------------------------------------------------------------
# Reading files, and errors that point at the file and line


ALPACA_ROWS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three", "four")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", "save_to_disk"])
def test_load_rows_reads_every_supported_kind(tmp_path, suffix):
    import datasets

    ds = datasets.Dataset.from_list(ALPACA_ROWS)
    path = tmp_path / f"rows{suffix if suffix.startswith('.') else ''}"
    if suffix == ".jsonl":
        write_jsonl(path, ALPACA_ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ALPACA_ROWS))
    elif suffix == ".csv":
        ds.to_csv(str(path), index=False)
    elif suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    rows = load_rows(str(path))
    assert [(r["instruction"], r["output"]) for r in rows] == [(r["instruction"], r["output"]) for r in ALPACA_ROWS]


def test_load_rows_missing_and_unsupported(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl.*\.jsonl/\.json/\.csv/\.parquet"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"rows\.txt: unsupported data file type '\.txt'"):
        load_rows(str(tmp_path / "rows.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_rows(str(tmp_path / "folder"))


def test_unparsable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "no closing brace"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl, line 3: invalid JSON"):
        load_rows(str(path))


GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


@pytest.mark.parametrize(
    ("bad", "fmt", "problem"),
    [
        ({"instruction": "Say hi.", "input": ""}, "alpaca", "field 'output' is missing"),
        (
            {"instruction": "Say hi.", "input": "", "output": 5},
            "alpaca",
            "field 'output' must be a string, got int",
        ),
        ({"instruction": "Say hi.", "input": 3, "output": "hi"}, "alpaca", "field 'input' must be a string"),
        ({"text": None}, "text", "field 'text' is missing"),
        ({"prompt": "a"}, "completion", "field 'completion' is missing"),
        ({"messages": "hello"}, "chat", "'messages' must be a non-empty list"),
        ({"messages": [{"content": "hi"}]}, "chat", r"messages\[0\] has no 'role'"),
        ({"messages": [{"role": "user", "content": 7}]}, "chat", r"messages\[0\] \(user\) has no string 'content'"),
    ],
)
def test_bad_row_error_names_file_and_line(tiny_tokenizer, tmp_path, bad, fmt, problem):
    good = {
        "alpaca": GOOD,
        "text": {"text": "fine"},
        "completion": {"prompt": "a", "completion": "b"},
        "chat": {"messages": CONVERSATIONS[0]},
    }[fmt]
    # Rows whose field types differ from the other rows: datasets 5 reads them (mixed column), older versions
    # fail and the file is scanned; either way the message names line 3.
    path = write_jsonl(tmp_path / "rows.jsonl", [good, good, bad, good])
    cfg = DataConfig(path=str(path), format=fmt)
    with pytest.raises(DataError, match=rf"rows\.jsonl, line 3: ({problem}|field '[\w.\[\]]+' is .* here but)"):
        prepare(cfg, tiny_tokenizer, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("rows-*")), "nothing is cached for bad data"


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"instruction": "Say hi."}, "field 'output' is missing"),  # found by the format's check
        (
            {"instruction": "Say hi.", "input": 3, "output": "hi"},
            "field 'input' is a number here but a string on line 1",
        ),
        ({"instruction": ["Say hi."], "output": "hi"}, "field 'instruction' is a list here but a string on line 1"),
    ],
)
def test_line_numbers_count_blank_lines(tiny_tokenizer, tmp_path, bad, problem):
    # With blank lines (skipped by the reader) rows and lines differ; a column of mixed types even makes
    # datasets fail without saying where, and the file is then scanned for the line.
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=rf"rows\.jsonl, line 4: {problem}"):
        prepare(DataConfig(path=str(path)), tiny_tokenizer, tmp_path / "cache")


def test_bad_row_in_csv_names_the_row(tiny_tokenizer, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\nSay hi.,,hi\nSay bye.,,\n")
    with pytest.raises(DataError, match=r"rows\.csv, row 1: field 'output' is missing"):
        prepare(DataConfig(path=str(path)), tiny_tokenizer, tmp_path / "cache")


def test_format_that_does_not_fit_the_columns(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="data.format=chat needs the column"):
        prepare(DataConfig(path=str(path), format="chat"), tiny_tokenizer, tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------------
# prepare_datasets: drop, split, cache, barrier


def test_examples_without_loss_tokens_are_dropped_and_logged(tiny_tokenizer, tmp_path, caplog):
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "answer"}
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, long_prompt, GOOD])
    caplog.set_level(logging.INFO, logger="qlora_dist.data")
    train, held_out = prepare(DataConfig(path=str(path), max_length=32), tiny_tokenizer, tmp_path / "cache")
    assert len(train) == 2 and held_out is None
    assert "dropped 1 of 3 examples" in caplog.text
    assert all(n > 0 for n in train["num_tokens"])
    assert train["num_tokens"] == [sum(x != IGNORE_INDEX for x in labels) for labels in train["labels"]]


def _keys(ds) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in ds["input_ids"]]


def test_eval_split_is_deterministic_disjoint_and_seeded(tiny_tokenizer, demo_data_dir, tmp_path):
    cfg = DataConfig(path=str(demo_data_dir / "alpaca_demo.jsonl"), eval_fraction=0.1, max_length=128)
    train_a, eval_a = prepare(cfg, tiny_tokenizer, tmp_path / "a", seed=1)
    train_b, eval_b = prepare(cfg, tiny_tokenizer, tmp_path / "b", seed=1)
    _, eval_c = prepare(cfg, tiny_tokenizer, tmp_path / "c", seed=2)
    n = len(load_rows(cfg.path))
    assert len(eval_a) == round(n * 0.1) and len(train_a) + len(eval_a) == n
    assert _keys(eval_a) == _keys(eval_b) and _keys(train_a) == _keys(train_b)
    assert not set(_keys(eval_a)) & set(_keys(train_a))
    assert set(_keys(eval_a)) != set(_keys(eval_c)), "another seed holds out other examples"


def test_tiny_eval_fraction_still_holds_out_one(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    train, held_out = prepare(DataConfig(path=str(path), eval_fraction=0.01), tiny_tokenizer, tmp_path / "cache")
    assert (len(train), len(held_out)) == (3, 1)


def test_cache_is_reused_and_keyed(tiny_tokenizer, demo_data_dir, tmp_path, monkeypatch):
    cfg = DataConfig(path=str(demo_data_dir / "completion_demo.jsonl"), eval_fraction=0.1, max_length=64)
    first = prepare(cfg, tiny_tokenizer, tmp_path)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].startswith("completion_demo-")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the second call must load the cache, not tokenize again")

    monkeypatch.setattr(data, "_build_cache", no_tokenizing)
    second = prepare(cfg, tiny_tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == entries
    for a, b in zip(first, second, strict=True):
        assert a.to_dict() == b.to_dict()
    monkeypatch.undo()

    # Anything that changes the tokens gets its own entry.
    prepare(DataConfig(path=cfg.path, eval_fraction=0.1, max_length=32), tiny_tokenizer, tmp_path)
    prepare(cfg, tiny_tokenizer, tmp_path, seed=5)
    assert len(list(tmp_path.iterdir())) == 3


def test_other_ranks_wait_then_load_what_main_wrote(tiny_tokenizer, demo_data_dir, tmp_path):
    cfg = DataConfig(path=str(demo_data_dir / "text_demo.jsonl"))
    calls = []
    with pytest.raises(DataError, match="main process did not write"):
        prepare(cfg, tiny_tokenizer, tmp_path, main=False, barrier=lambda: calls.append("worker"))
    assert calls == ["worker"]
    main_train, _ = prepare(cfg, tiny_tokenizer, tmp_path, main=True, barrier=lambda: calls.append("main"))
    worker_train, _ = prepare(cfg, tiny_tokenizer, tmp_path, main=False, barrier=lambda: calls.append("worker"))
    assert calls == ["worker", "main", "worker"]
    assert main_train.to_dict() == worker_train.to_dict()


def test_main_failure_still_releases_the_barrier(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "?"}])
    calls = []
    with pytest.raises(DataError, match="cannot tell the data format"):
        prepare(DataConfig(path=str(path)), tiny_tokenizer, tmp_path / "c", barrier=lambda: calls.append(1))
    with pytest.raises(DataError, match="data file not found"):
        prepare(
            DataConfig(path=str(tmp_path / "gone.jsonl")),
            tiny_tokenizer,
            tmp_path / "c",
            barrier=lambda: calls.append(1),
        )
    assert calls == [1, 1]


# ----------------------------------------------------------------------------------------------------------
# Order and sharding


def test_epoch_order_is_a_pure_seeded_permutation():
    order = epoch_order(50, seed=3, epoch=0)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=3, epoch=0)
    assert order != epoch_order(50, seed=3, epoch=1)
    assert order != epoch_order(50, seed=4, epoch=0)


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 2), (11, 2), (17, 4), (3, 3), (5, 8)])
def test_rank_indices_are_disjoint_equal_and_cover_all_but_fewer_than_world(n, world):
    for epoch in range(3):
        shards = [rank_indices(n, 0, epoch, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1, "every rank takes the same number of steps"
        seen = [i for s in shards for i in s]
        assert len(seen) == len(set(seen)), "shards are disjoint"
        assert n - len(seen) == n % world < world
    skipped = [set(range(n)) - {i for r in range(world) for i in rank_indices(n, 0, e, r, world)} for e in range(6)]
    if n % world and n > world:
        assert len({frozenset(s) for s in skipped}) > 1, "a different example is skipped in some epoch"
    assert rank_indices(n, 0, 0, 0, world) != rank_indices(n, 0, 1, 0, world) or n < 2 * world


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_two_ranks_batch_b_equal_one_rank_batch_2b(micro_batch):
    n, b = 29, micro_batch
    single = rank_indices(n, 7, 2, 0, 1)
    r0, r1 = rank_indices(n, 7, 2, 0, 2), rank_indices(n, 7, 2, 1, 2)
    for k in range(len(r0) // b):
        two_ranks = set(r0[k * b : (k + 1) * b]) | set(r1[k * b : (k + 1) * b])
        assert two_ranks == set(single[k * 2 * b : (k + 1) * 2 * b])


# ----------------------------------------------------------------------------------------------------------
# Collation and packing


def test_collate_unpacked_pads_right_and_masks():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_packed_has_positions_and_no_attention_mask():
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, -100, 4, 5], "position_ids": [0, 1, 0, 1, 2]},
        {"input_ids": [6, 7], "labels": [-100, 7], "position_ids": [0, 1]},
    ]
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "real_tokens"}
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert batch["real_tokens"].tolist() == [5, 2]  # non-pad tokens, for tokens/s (not a model input)
    assert batch["labels"][1].tolist() == [-100, 7, -100, -100, -100]
    with pytest.raises(ValueError, match="mix"):
        collate([rows[0], {"input_ids": [1], "labels": [-100]}], pad_id=0)


def test_pack_examples_fills_rows_and_keeps_examples_whole():
    examples = [
        {"input_ids": [100 * k + j for j in range(n)], "labels": [IGNORE_INDEX, *range(1, n)]}
        for k, n in enumerate((4, 3, 5, 2, 6))
    ]
    packed = pack_examples(examples, max_length=8)
    # Longest first, each into the first row with room: 6+2, 5+3, 4. In file order it would take 4 rows.
    assert [len(p["input_ids"]) for p in packed] == [8, 8, 4]
    assert [p["position_ids"] for p in packed] == [
        [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3]
    ]  # fmt: skip
    # Every example exactly once, whole and contiguous, found again from the position restarts.
    found = []
    for p in packed:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        found += [p["input_ids"][a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert sorted(found) == sorted(e["input_ids"] for e in examples)
    for p in packed:  # no label at a boundary: nothing is predicted from the previous example
        assert all(label == IGNORE_INDEX for label, pos in zip(p["labels"], p["position_ids"], strict=True) if pos == 0)
    with pytest.raises(ValueError, match="longer than max_length"):
        pack_examples(examples, max_length=5)


def test_first_fit_decreasing_is_valid_and_near_optimal():
    import random

    from qlora_dist.data import first_fit_decreasing

    rng = random.Random(0)
    for capacity, count in ((1024, 600), (4096, 5000), (10, 1)):
        sizes = [rng.randint(1, capacity) for _ in range(count)]
        bins = first_fit_decreasing(sizes, capacity)
        assert sorted(i for b in bins for i in b) == list(range(count))  # every item once
        assert all(sum(sizes[i] for i in b) <= capacity for b in bins)
        lower_bound = -(-sum(sizes) // capacity)
        assert len(bins) <= 11 / 9 * lower_bound + 1  # FFD's worst case against the optimum
    assert first_fit_decreasing([], 8) == []


def _per_example_loss(model, batch: dict) -> list[float]:
    """Summed next-token loss of each example in the batch, examples found by position_ids restarting at 0."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    losses = []
    for row in range(logits.shape[0]):
        token_loss = torch.nn.functional.cross_entropy(
            logits[row, :-1], batch["labels"][row, 1:], ignore_index=IGNORE_INDEX, reduction="none"
        )
        token_loss = torch.cat([token_loss.new_zeros(1), token_loss])  # token_loss[t]: loss of predicting token t
        # Padding sits in the last example's span and adds 0 (its labels are -100).
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() if "position_ids" in batch else [0]
        bounds = [*starts, logits.shape[1]]
        losses += [float(token_loss[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return losses


@pytest.mark.parametrize(
    ("arch", "attn"),
    [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("llama", "packed"), ("qwen2", "packed")],
)
def test_packing_does_not_leak_between_examples(request, tiny_tokenizer, demo_data_dir, tmp_path, arch, attn):
    from transformers import AutoModelForCausalLM

    from qlora_dist import attention

    if attn == "packed":  # what runs with data.packing load their model with
        attn = attention.register()

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    path = str(demo_data_dir / "alpaca_demo.jsonl")
    packed, _ = prepare(DataConfig(path=path, max_length=160, packing=True), tiny_tokenizer, tmp_path)
    plain, _ = prepare(DataConfig(path=path, max_length=160), tiny_tokenizer, tmp_path)

    rows = [packed[0], packed[len(packed) - 1]]  # a full row and the last, shortest one: padding is exercised
    assert len(rows[0]["input_ids"]) > len(rows[1]["input_ids"])
    # The unpacked example behind each packed span, in packed order.
    by_ids = {tuple(p["input_ids"]): i for i, p in enumerate(plain)}
    members = []
    for r in rows:
        starts = [i for i, pos in enumerate(r["position_ids"]) if pos == 0] + [len(r["input_ids"])]
        members += [by_ids[tuple(r["input_ids"][a:b])] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert len(members) >= 4
    assert sum(r["num_tokens"] for r in rows) == sum(plain[i]["num_tokens"] for i in members)

    packed_batch = collate(rows, tiny_tokenizer.pad_token_id)
    plain_batch = collate([plain[i] for i in members], tiny_tokenizer.pad_token_id)
    got, want = _per_example_loss(model, packed_batch), _per_example_loss(model, plain_batch)
    assert got == pytest.approx(want, abs=1e-4)

    # The comparison has teeth: the same packed rows with plain positions (one long sequence each) differ.
    leaky = {k: v for k, v in packed_batch.items() if k != "position_ids"}
    assert sum(_per_example_loss(model, leaky)) != pytest.approx(sum(want), abs=1e-2)


# ----------------------------------------------------------------------------------------------------------
# Tiny builders


def test_tiny_builders_are_deterministic(tiny_tokenizer, tiny_tokenizer_dir, tiny_llama_dir, demo_data_dir, tmp_path):
    from qlora_dist.tiny import build_tiny_model, demo_texts, train_tokenizer

    train_tokenizer(demo_texts(demo_data_dir), tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (tiny_tokenizer_dir / "tokenizer.json").read_bytes()
    before = torch.random.get_rng_state()
    build_tiny_model(tmp_path / "model", tiny_tokenizer, arch="llama")
    assert torch.equal(before, torch.random.get_rng_state()), "building a model leaves the global RNG alone"
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (
        tiny_llama_dir / "model.safetensors"
    ).read_bytes()


def test_tiny_models_match_the_tokenizer(tiny_tokenizer, tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoConfig, AutoTokenizer

    for folder, model_type in ((tiny_llama_dir, "llama"), (tiny_qwen2_dir, "qwen2")):
        config = AutoConfig.from_pretrained(folder)
        assert config.model_type == model_type
        assert config.vocab_size == len(tiny_tokenizer)
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template is not None and tok.pad_token_id != tok.eos_token_id
    from safetensors import safe_open

    with safe_open(str(tiny_qwen2_dir / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.bias" in set(f.keys())


def test_pretrain_tiny_model_learns_and_saves(tiny_llama_dir, demo_data_dir, tmp_path):
    import shutil

    from qlora_dist.tiny import plain_texts, pretrain_tiny_model

    texts = plain_texts(demo_data_dir)
    assert "What is the capital of France? The capital of France is Paris." in texts
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    losses = pretrain_tiny_model(tmp_path / "m", texts, steps=12, batch_size=8)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert weights != (tiny_llama_dir / "model.safetensors").read_bytes()
