"""Training data: from a file on disk to padded tensor batches, identical on every rank.

The pipeline, in the order a run uses it:

1. :func:`load_rows` reads a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a ``save_to_disk`` folder with
   the ``datasets`` library.
2. :func:`detect_format` picks the format from the columns when ``data.format`` is ``auto``.
3. :func:`tokenize_example` turns one row into ``input_ids`` and ``labels`` (``-100`` where no loss is taken),
   so that the loss falls only on what the model should learn to write: the response (alpaca), the
   assistant turns (chat), the completion (completion), or everything (text).
4. :func:`prepare_datasets` does 1-3 for the whole file on the main process, holds out an eval split, drops
   examples left with nothing to learn, optionally packs examples into longer sequences, and caches the result
   on disk so the other ranks (and the next run) load it instead of tokenizing again.
5. :func:`rank_indices` gives each rank its disjoint, equally long share of a per-epoch shuffled order (grouped
   by length with ``data.group_by_length``, :func:`group_by_length`), and :func:`collate` pads a list of rows
   into tensors.

Label convention: position 0 of every tokenized example has label ``-100``. Causal LMs predict token ``t`` from
the tokens before it (transformers shifts labels inside the loss), so the first token of a sequence is never a
target anyway; making that explicit keeps ``num_tokens`` (the count of labels ``!= -100``) equal to the number
of loss terms, and it is exactly what packing needs: the first token of a packed example must not be predicted
from the end of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import torch

from .balance import StepCost, split_by_tokens
from .config import DataConfig
from .datafile import check_path
from .errors import DataError
from .formats import FORMATS, data_format

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value the loss skips (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``)."""

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
"""The columns each built-in format needs, in the order ``auto`` tries them (plugins are never guessed)."""

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Bump when the tokenization/packing output changes, so caches written by older code are not reused.
_CACHE_VERSION = 2


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
"""Roles chat templates know; any other (a typo, ``wizard``) would be rendered or dropped by the template
without a word, depending on the model."""


class _RowError(DataError):
    """A problem with one row; :func:`prepare_datasets` prefixes it with the file and line (or row)."""


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_rows(path: str, cache_dir: Path | None = None) -> datasets.Dataset:
    """Read a data file or ``save_to_disk`` folder into a :class:`datasets.Dataset`, one row per example.

    Files go through ``datasets.load_dataset`` (the ``json``, ``csv`` or ``parquet`` builder). ``datasets``
    converts a file to Arrow in a cache folder first: into ``cache_dir`` when given (and kept there), otherwise
    into a temporary folder that is deleted once the rows are in memory, so nothing lands silently in the
    user's home cache. Raises :class:`DataError` for a missing path, an unsupported file type, an unreadable
    file, or one with no rows.
    """
    p = Path(path)
    check_path(p)
    if p.is_dir():
        rows = _load_saved_folder(p)
    else:
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(
                f"{p}: unsupported data file type {p.suffix or '(no extension)'!r}; "
                f"use one of {', '.join(_FILE_BUILDERS)} or a save_to_disk folder (convert the file, or rename it "
                "if it already is one of these)"
            )
        if builder in ("json", "csv"):
            _check_utf8(p)  # Arrow keeps invalid bytes and fails on reading the row, with a traceback
        rows = _load_file(p, builder, cache_dir)
        if len(rows) == 1 and builder == "json" and p.suffix.lower() == ".json":
            _check_not_single_object(p)
    if len(rows) == 0:
        raise DataError(f"{p}: has no rows")
    return rows


def _check_utf8(p: Path) -> None:
    """Refuse a text data file that is not UTF-8, naming the line, the column and the byte."""
    with p.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{p}, line {number}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8; save the "
                    "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


def _check_not_single_object(p: Path) -> None:
    """A ``.json`` file holding one object reads as a data set of one row: almost always a mistake."""
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return  # one object per line (JSON Lines in a .json file): one row is what it holds
    if isinstance(value, dict):
        raise DataError(
            f"{p}: holds one JSON object, not a list of rows (keys {', '.join(list(value)[:5])}); write the rows "
            "as a JSON array [{...}, {...}] or one object per line (.jsonl)"
        )


def _resolve_format(rows: datasets.Dataset, fmt: str, path: str | Path):
    """(name, DataFormat) for ``data.format`` (``auto``: from the columns); the file must have its columns."""
    fmt = fmt if fmt != "auto" else detect_format(rows.column_names)
    data_fmt = FORMATS.get(fmt)
    missing = [c for c in data_fmt.columns if c not in rows.column_names]
    if missing:
        raise DataError(
            f"{path}: data.format={fmt} needs the column(s) {', '.join(missing)}, but the file has "
            f"{', '.join(rows.column_names)}; rename them or set data.format=auto"
        )
    return fmt, data_fmt


def check_rows(rows: datasets.Dataset, fmt: str, path: str) -> str:
    """Validate every row for format ``fmt`` without tokenizing; returns the resolved format name.

    Raises :class:`DataError` naming the file and line (or row) of the first bad row.
    """
    fmt, data_fmt = _resolve_format(rows, fmt, path)
    for index, row in enumerate(rows):
        try:
            data_fmt.check_row(row)
        except (_RowError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"{_row_location(Path(path), index)}: {e}") from None
    return fmt


def _load_saved_folder(p: Path) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError or its own errors for a non-dataset folder
        raise DataError(
            f"{p}: is a folder but not one written by datasets' save_to_disk ({e}); "
            "point data.path at a data file or at a save_to_disk folder"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f"{p}: holds a DatasetDict with splits {', '.join(loaded)} but no 'train' split; "
                "save the split to train on by itself (dataset_dict[name].save_to_disk(...))"
            )
        loaded = loaded["train"]
    return loaded


def _load_file(p: Path, builder: str, cache_dir: Path | None) -> datasets.Dataset:
    def read(folder: str, in_memory: bool) -> datasets.Dataset:
        return datasets.load_dataset(
            builder, data_files=str(p), split="train", cache_dir=folder, keep_in_memory=in_memory
        )

    try:
        with _quiet_datasets():
            if cache_dir is not None:
                return read(str(cache_dir), in_memory=False)
            # keep_in_memory: the rows must not be memory-mapped from the temporary folder we are about to delete.
            with tempfile.TemporaryDirectory(prefix="qlora_dist_rows_") as tmp:
                return read(tmp, in_memory=True)
    except Exception as e:
        raise DataError(_unreadable_message(p, builder, e)) from None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide ``datasets``' progress bars (one per split and save, on a file this small they are noise)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _unreadable_message(p: Path, builder: str, error: Exception) -> str:
    """Say why a file did not parse, naming the first bad line of a JSON Lines file when one can be found."""
    detail = " ".join(str(error).split())[:300]
    if builder == "json" and p.suffix.lower() == ".jsonl":
        bad = _first_bad_jsonl_line(p)
        if bad is not None:
            line, problem = bad
            return (
                f"{p}, line {line}: {problem}; each line of a .jsonl file must be one JSON object, fields typed alike"
            )
    hint = {
        "json": "a .json file must hold a list of objects (or one object per line); check its syntax and "
        "that each field has the same type in every row",
        "csv": "check the header line, the delimiter (must be ',') and the quoting",
        "parquet": "the file may be truncated or not Parquet",
    }[builder]
    return f"{p}: could not be read as {builder} ({type(error).__name__}: {detail}); {hint}"


def _first_bad_jsonl_line(p: Path) -> tuple[int, str] | None:
    """The first line that is not a JSON object, or whose field has another JSON type than on an earlier line.

    Arrow needs one type per column; ``datasets`` reports a mixed column without saying where it is.
    """
    first_seen: dict[str, tuple[str, int]] = {}
    with p.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return number, f"invalid JSON ({e.msg} at column {e.colno})"
            if not isinstance(value, dict):
                return number, f"expected a JSON object, found {_json_type(value)}"
            for key, kind in _json_types(value, ""):
                seen = first_seen.setdefault(key, (kind, number))
                if seen[0] != kind:
                    return number, f"field {key!r} is {kind} here but {seen[0]} on line {seen[1]}"
    return None


def _json_types(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """(path, JSON type) of every non-null value inside an object, list items sharing the path ``name[]``."""
    items = value.items() if isinstance(value, dict) else (("[]", v) for v in value)
    for key, item in items:
        path = f"{prefix}{key}" if key == "[]" or not prefix else f"{prefix}.{key}"
        kind = _json_type(item)
        if kind != "null":
            yield path, kind
        if isinstance(item, (dict, list)):
            yield from _json_types(item, path)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _row_location(path: Path, index: int) -> str:
    """``path, line N`` for JSON Lines (blank lines are skipped by the reader, so count them), else ``path, row i``."""
    if path.is_file() and path.suffix.lower() == ".jsonl":
        seen = -1
        with path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    seen += 1
                    if seen == index:
                        return f"{path}, line {number}"
    return f"{path}, row {index}"


# ----------------------------------------------------------------------------------------------------------
# Formats


def detect_format(columns: Iterable[str]) -> str:
    """The format whose required columns are all present, trying chat, alpaca, completion, text in that order."""
    present = set(columns)
    for fmt, needed in FORMAT_COLUMNS.items():
        if set(needed) <= present:
            return fmt
    needs = "; ".join(f"{fmt}: {' + '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    found = ", ".join(sorted(present)) or "(none)"
    raise DataError(
        f"cannot tell the data format from the columns {found}. Each format needs these columns: {needs}. "
        "Rename the columns, or set data.format and give the columns it needs"
    )


ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt an alpaca example is trained with; generate from it to query a model trained on alpaca rows."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def tokenize_example(row: dict[str, Any], fmt: str, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Tokenize one row of format ``fmt`` into ``input_ids`` and ``labels`` (``-100`` where no loss is taken).

    - alpaca: ``alpaca_prompt(instruction, input)`` then ``output`` + eos; loss on ``output`` + eos.
    - chat: ``messages`` rendered with the tokenizer's chat template; loss on the assistant turns' tokens only
      (content and whatever the template closes the turn with), never on system/user turns or the headers.
    - completion: ``prompt`` then ``completion`` + eos; loss on ``completion`` + eos.
    - text: ``text`` + eos; loss on every token.

    The prompt is tokenized with the tokenizer's special tokens (bos, if it adds one) and the answer without,
    the same split a generation from the prompt sees. Both lists are cut to ``max_length``; ``labels[0]`` is
    always ``-100`` (see the module docstring). A malformed row raises :class:`DataError`.
    """
    return _truncate(_tokenize_untruncated(row, fmt, tokenizer), max_length)


def _tokenize_untruncated(row: dict[str, Any], fmt: str, tokenizer: Any) -> dict[str, list[int]]:
    data_fmt = FORMATS.get(fmt)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer at {_tokenizer_name(tokenizer)} has no eos token; set tokenizer.eos_token")
    input_ids, labels = data_fmt.tokenize(row, tokenizer)
    return {"input_ids": list(input_ids), "labels": list(labels)}


def _truncate(example: dict[str, list[int]], max_length: int) -> dict[str, list[int]]:
    input_ids, labels = example["input_ids"][:max_length], example["labels"][:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _field(row: dict[str, Any], name: str, optional: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        raise _RowError(f"field {name!r} is missing or null")
    if not isinstance(value, str):
        raise _RowError(f"field {name!r} must be a string, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _prompt_answer(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    prompt_ids = _encode(tokenizer, prompt, special=True)
    answer_ids = _encode(tokenizer, answer, special=False) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


@data_format(
    "alpaca",
    columns=("instruction", "output"),
    validate=lambda row: (_field(row, "instruction"), _field(row, "input", optional=True), _field(row, "output")),
)
def _tokenize_alpaca(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt = alpaca_prompt(_field(row, "instruction"), _field(row, "input", optional=True))
    return _prompt_answer(tokenizer, prompt, _field(row, "output"))


@data_format(
    "completion",
    columns=("prompt", "completion"),
    validate=lambda row: (_field(row, "prompt"), _field(row, "completion")),
)
def _tokenize_completion(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    return _prompt_answer(tokenizer, _field(row, "prompt"), _field(row, "completion"))


@data_format("text", columns=("text",), validate=lambda row: _field(row, "text"))
def _tokenize_text(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    ids = _encode(tokenizer, _field(row, "text"), special=True) + [tokenizer.eos_token_id]
    return ids, list(ids)


@data_format(
    "chat", columns=("messages",), needs_chat_template=True, validate=lambda row: _check_messages(row.get("messages"))
)
def _tokenize_chat(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    messages = _check_messages(row.get("messages"))
    _require_chat_template(tokenizer)
    # Which tokens belong to assistant turns? Render the conversation up to each assistant turn (with the
    # generation prompt, i.e. the turn header) and up to the end of that turn; the tokens between the two are
    # the turn's. This works for any template, as long as rendering is prefix-stable: each partial rendering
    # tokenizes to a prefix of the full one. That is checked, not assumed (templates that rewrite earlier
    # turns, e.g. drop past reasoning, or tokenizers that merge across the boundary, fail it).
    full = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if end[: len(start)] != start or full[: len(end)] != end:
            raise _RowError(
                f"the chat template of tokenizer {_tokenizer_name(tokenizer)} is not prefix-stable at message {i} "
                "(rendering the conversation up to a turn does not tokenize to a prefix of the whole), so the "
                "assistant tokens cannot be located reliably; use a template that renders earlier turns "
                "unchanged, or the completion format with your own prompt/completion split"
            )
        labels[len(start) : len(end)] = full[len(start) : len(end)]
    return full, labels


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise _RowError("field 'messages' is missing or null")
    if not isinstance(messages, list) or not messages:
        raise _RowError(f"'messages' must be a non-empty list of {{role, content}} objects, got {_short(messages)}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RowError(f"messages[{i}] must be an object with 'role' and 'content', got {_short(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise _RowError(f"messages[{i}] has no 'role' (a string such as system, user or assistant)")
        if role not in CHAT_ROLES:
            raise _RowError(f"messages[{i}] has role {role!r}: use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise _RowError(f"messages[{i}] ({role}) has no string 'content', got {_short(content)}")
        # Keep only role/content: Arrow fills keys that other rows have (e.g. tool_calls) with None, and a
        # template would see those as present.
        clean.append({"role": role, "content": content})
    return clean


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 errors, including the template's own raise_exception(...)
        raise _RowError(f"the chat template rejected these messages: {e}") from None
    # The template writes the special tokens (bos, turn markers) itself, so the tokenizer must not add more.
    return _encode(tokenizer, text, special=False)


def _require_chat_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"tokenizer at {_tokenizer_name(tokenizer)} has no chat template, so chat rows cannot be rendered; "
            "use a tokenizer that ships one (an instruct/chat model's), set tokenizer.chat_template, or convert "
            "the data to the completion or alpaca format"
        )


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "(in memory)")


# ----------------------------------------------------------------------------------------------------------
# Packing


def pack_examples(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into sequences of at most ``max_length`` tokens, as few and as full as possible.

    Examples are placed longest first, each into the first sequence with room for it (first-fit decreasing):
    packing in file order leaves every sequence as short as the example that did not fit, and that gap is
    padding the model computes on. Rows come out in the order they were opened; the run shuffles them per epoch.

    Each packed row has ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 for each example.
    Restarting positions is what keeps examples apart: transformers' mask builder and the packed attention
    (:mod:`qlora_dist.attention`) treat a position that does not follow its predecessor as the start of a new
    sequence and block attention across it (see :func:`collate`). Labels need no extra work because every
    example's first label is ``-100``.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    for n in lengths:
        if n > max_length:
            raise ValueError(f"example of {n} tokens is longer than max_length={max_length}; truncate first")
    packed = []
    for members in first_fit_decreasing(lengths, max_length):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ids.extend(examples[i]["input_ids"])
            labels.extend(examples[i]["labels"])
            positions.extend(range(lengths[i]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most ``capacity``: items longest first (ties by index), each into
    the first bin with room. O(n log n): a tree over the bins holds each subtree's largest free space, so the
    first bin that fits is found by walking down from the root."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    leaves = 1
    while leaves < len(sizes):
        leaves *= 2
    free = [0] * (2 * leaves)  # free[1] is the root; the leaves free[leaves + b] are the bins, opened in order
    bins: list[list[int]] = []
    for i in order:
        size = sizes[i]
        if bins and free[1] >= size:
            node = 1
            while node < leaves:  # go left whenever the left subtree has a bin that fits
                node = 2 * node if free[2 * node] >= size else 2 * node + 1
            b = node - leaves
        else:
            b, node = len(bins), leaves + len(bins)
            bins.append([])
            free[node] = capacity
        bins[b].append(i)
        free[node] -= size
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


# ----------------------------------------------------------------------------------------------------------
# The datasets a run trains and evaluates on


def prepare_datasets(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_dir: Path,
    is_main_process: bool,
    wait_for_everyone: Callable[[], None],
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """:func:`prepare_sources` without the per-source counts: the (train, eval) data sets."""
    train, held_out, _ = prepare_sources(cfg, tokenizer, seed, cache_dir, is_main_process, wait_for_everyone)
    return train, held_out


def prepare_sources(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_dir: Path,
    is_main_process: bool,
    wait_for_everyone: Callable[[], None],
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[dict[str, Any]]]:
    """Tokenized (and optionally packed) train and eval datasets, the same on every process.

    The main process loads the file, checks every row (the first bad one raises :class:`DataError` naming the
    file and line), holds out ``cfg.eval_fraction`` of the examples (chosen by ``seed``; ``None`` when 0),
    tokenizes, and saves the result under ``cache_dir/<name>-<hash>``, the hash covering the data bytes, the
    tokenizer, the format, ``max_length``, ``packing``, ``eval_fraction`` and ``seed``. Other processes wait,
    then load that folder. When the folder already exists, the main process loads it too (no re-tokenizing).

    Every process calls ``wait_for_everyone`` exactly once, also when the main process fails (it then
    releases the others, which raise instead of hanging). ``cache_dir`` must be visible to all processes: on
    several machines without a shared filesystem, call this with each node's local main process as main.

    Each row has ``input_ids``, ``labels``, ``num_tokens`` (labels that are not ``-100``, for normalizing the
    loss) and, when packing, ``position_ids``; with ``data.datasets``, unpacked rows also have ``source``
    (the index of the data set they came from).

    Several sources (``data.datasets``) are each read, checked and tokenized in their own format, each holds
    out its own ``eval_fraction``, and their training examples are mixed by weight (:func:`weighted_pick`)
    into one data set, so every later step (the per-epoch order, rank sharding, resume) is the same as for one
    file. The third value has one entry per source: path, format, weight, and its examples in the mixture.
    """
    if is_main_process:
        try:
            target = Path(cache_dir) / _cache_name(cfg, tokenizer, seed)
            if _is_complete(target):
                logger.info("data: reusing the tokenized data cached in %s", target)
            else:
                _build_cache(cfg, tokenizer, seed, target)
        except Exception:
            wait_for_everyone()  # release the other ranks so they fail now instead of hanging in the barrier
            raise
        wait_for_everyone()
    else:
        try:
            target = Path(cache_dir) / _cache_name(cfg, tokenizer, seed)
        except Exception:
            wait_for_everyone()
            raise
        wait_for_everyone()
        if not _is_complete(target):
            raise DataError(
                f"the main process did not write the tokenized data to {target}: see its error above; if the "
                "processes run on several machines, the cache folder must be on a filesystem they share"
            )
    return _load_cache(target)


def _build_cache(cfg: DataConfig, tokenizer: Any, seed: int, target: Path) -> None:
    sources = cfg.sources()
    if not cfg.datasets:  # data.path: one file, as it always was (data.datasets of one source still weighs it)
        train, held_out, fmt = _tokenize_source(cfg, sources[0].path, sources[0].format, tokenizer, seed)
        facts = [_source_facts(sources[0], fmt, len(train), len(train), len(held_out))]
    else:
        train, held_out, facts = [], [], []
        for i, source in enumerate(sources):
            # Each source's own eval split (seeded apart), then its training examples weighted into the mixture.
            src_train, src_eval, fmt = _tokenize_source(cfg, source.path, source.format, tokenizer, _mix(seed, i))
            picked = weighted_pick(len(src_train), source.weight, seed, i)
            if not picked:
                raise DataError(
                    f"data.datasets[{i}] ({source.path}): weight {source.weight} of {len(src_train)} examples "
                    "leaves none to train on; raise the weight or remove the source"
                )
            train += [{**src_train[j], "source": i} for j in picked]
            held_out += src_eval
            facts.append(_source_facts(source, fmt, len(src_train), len(picked), len(src_eval)))
        logger.info(
            "data: %d sources mixed into %d training examples (%s)",
            len(sources),
            len(train),
            ", ".join(f"{Path(f['path']).name}: {f['train_examples']}" for f in facts),
        )
    if cfg.packing:
        train, held_out = pack_examples(train, cfg.max_length), pack_examples(held_out, cfg.max_length)
        logger.info(
            "data: packed into %d train and %d eval sequences of up to %d tokens",
            len(train),
            len(held_out),
            cfg.max_length,
        )
    _write_cache(target, train, held_out if cfg.eval_fraction > 0 else None, facts)


def _source_facts(source, fmt: str, examples: int, in_mixture: int, held_out: int) -> dict[str, Any]:
    return {
        "path": source.path,
        "format": fmt,
        "weight": source.weight,
        "examples": examples,
        "train_examples": in_mixture,
        "eval_examples": held_out,
    }


def weighted_pick(n: int, weight: float, seed: int, source: int) -> list[int]:
    """Which of a source's ``n`` training examples go into the mixture, and how often: every example
    ``floor(weight)`` times, plus a seeded ``weight - floor(weight)`` share of them once more.

    A pure function of its arguments, so the mixture (and with it the global order of every epoch) is the same
    on every rank and in every resumed run. The picked examples are the same each epoch; the epoch's order
    shuffles the whole mixture anew.
    """
    whole = int(weight)
    extra = round((weight - whole) * n)
    gen = torch.Generator().manual_seed(_mix(seed, "weight", source))
    return list(range(n)) * whole + sorted(torch.randperm(n, generator=gen)[:extra].tolist())


def _tokenize_source(
    cfg: DataConfig, source_path: str, source_format: str, tokenizer: Any, seed: int
) -> tuple[list[dict], list[dict], str]:
    """One file's (train examples, held-out examples, resolved format), checked, tokenized, truncated."""
    path = Path(source_path)
    rows = load_rows(source_path)
    fmt, data_fmt = _resolve_format(rows, source_format, path)
    if data_fmt.needs_chat_template:
        _require_chat_template(tokenizer)

    examples: list[dict[str, list[int]]] = []
    dropped = truncated = 0
    for index, row in enumerate(rows):
        try:
            full = _tokenize_untruncated(row, fmt, tokenizer)
        except _RowError as e:
            raise DataError(f"{_row_location(path, index)}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:  # a plugin format's own errors
            raise DataError(f"{_row_location(path, index)}: {type(e).__name__}: {e}") from None
        truncated += len(full["input_ids"]) > cfg.max_length
        ex = _truncate(full, cfg.max_length)
        if any(label != IGNORE_INDEX for label in ex["labels"]):
            examples.append(ex)
        else:
            dropped += 1
    if dropped:
        logger.warning(
            "data: dropped %d of %d examples that have no tokens to learn from (e.g. the answer was cut off by "
            "data.max_length=%d, or a conversation has no assistant turn)",
            dropped,
            len(rows),
            cfg.max_length,
        )
    if truncated:
        logger.info("data: %d examples reach data.max_length=%d and were cut there", truncated, cfg.max_length)

    train, held_out = _split(examples, cfg.eval_fraction, seed, path)
    logger.info("data: %s (%s format): %d train and %d eval examples", path, fmt, len(train), len(held_out))
    return train, held_out, fmt


def _split(examples: list[dict], fraction: float, seed: int, path: Path) -> tuple[list[dict], list[dict]]:
    """Hold out ``fraction`` of the examples (at least one when > 0), picked by a permutation seeded by ``seed``."""
    n = len(examples)
    if n == 0:
        raise DataError(f"{path}: no example has any token to learn from; check data.format and data.max_length")
    if fraction <= 0:
        return examples, []
    if n < 2:
        raise DataError(f"{path}: data.eval_fraction={fraction} needs at least 2 usable examples, found {n}")
    n_eval = min(max(1, round(n * fraction)), n - 1)
    gen = torch.Generator().manual_seed(_mix(seed, "eval-split"))
    held = set(torch.randperm(n, generator=gen)[:n_eval].tolist())
    # Both parts keep file order: the training order is shuffled per epoch later, and packing stays readable.
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _with_counts(rows: list[dict[str, list[int]]]) -> datasets.Dataset:
    columns: dict[str, list] = {key: [r[key] for r in rows] for key in rows[0]}
    columns["num_tokens"] = [label_count(r["labels"]) for r in rows]
    return datasets.Dataset.from_dict(columns)


def _write_cache(
    target: Path, train: list[dict], held_out: list[dict] | None, sources: list[dict[str, Any]] | None = None
) -> None:
    # Write next to the target, then rename: a crash or a concurrent run never leaves a half-written folder
    # under the final name, and readers only test for that name.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _quiet_datasets():
            _with_counts(train).save_to_disk(str(tmp / "train"))
            if held_out:
                _with_counts(held_out).save_to_disk(str(tmp / "eval"))
        done = {"version": _CACHE_VERSION, "eval": bool(held_out), "sources": sources or []}
        (tmp / "done.json").write_text(json.dumps(done))
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # lost a race to another run that wrote the same data: theirs is ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(target: Path) -> bool:
    return (target / "done.json").is_file()


def _load_cache(target: Path) -> tuple[datasets.Dataset, datasets.Dataset | None, list[dict[str, Any]]]:
    done = json.loads((target / "done.json").read_text())
    train = datasets.load_from_disk(str(target / "train"))
    held_out = datasets.load_from_disk(str(target / "eval")) if done["eval"] else None
    return train, held_out, done.get("sources", [])


def _cache_name(cfg: DataConfig, tokenizer: Any, seed: int) -> str:
    sources = cfg.sources()
    for source in sources:
        check_path(Path(source.path))
    path = Path(sources[0].path)
    key = {
        "version": _CACHE_VERSION,
        # One source keeps the key it always had; several add each one's bytes, format and weight.
        "data": _hash_path(path)
        if not cfg.datasets
        else [[_hash_path(Path(s.path)), s.format, s.weight] for s in sources],
        "tokenizer": _hash_tokenizer(tokenizer),
        "format": sources[0].format if not cfg.datasets else "mixed",
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "eval_fraction": cfg.eval_fraction,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{path.stem or 'data'}{'-mix' if cfg.datasets else ''}-{digest}"


def _hash_path(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_tokenizer(tokenizer: Any) -> str:
    """Hash what decides the token ids: the backend's full definition, the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Padding/truncation settings are runtime state, not part of the vocabulary; we pad and cut ourselves.
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:  # a slow tokenizer: its vocabulary is the best summary available
        definition = sorted(tokenizer.get_vocab().items())
    parts = {
        "class": type(tokenizer).__name__,
        "definition": definition,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Order, sharding and batches


def _mix(seed: int, *parts: object) -> int:
    """A 63-bit generator seed from ``seed`` and ``parts``, stable across processes and Python versions."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


GROUP_CHUNK_BATCHES = 32
"""Length grouping sorts the order within chunks of this many global batches (see :func:`group_by_length`)."""


def epoch_order(
    n: int, seed: int, epoch: int, lengths: Sequence[int] | None = None, global_batch: int = 0
) -> list[int]:
    """The order of ``n`` examples in ``epoch``: a seeded shuffle, new each epoch, a pure function of its arguments.

    With ``lengths`` (one per example), the shuffle is then grouped by length for batches of ``global_batch``
    examples (see :func:`group_by_length`); without, it is the plain shuffle, which depends on ``(seed, epoch)``
    only.
    """
    gen = torch.Generator().manual_seed(_mix(seed, "epoch", epoch))
    order = torch.randperm(n, generator=gen).tolist()
    if lengths is None:
        return order
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} examples")
    return group_by_length(order, lengths, global_batch, seed, epoch)


def group_by_length(
    order: Sequence[int],
    lengths: Sequence[int],
    global_batch: int,
    seed: int,
    epoch: int,
    chunk_batches: int = GROUP_CHUNK_BATCHES,
) -> list[int]:
    """Permute a shuffled ``order`` so each global batch holds examples of similar length (less padding).

    The order is cut into chunks of ``chunk_batches`` global batches; each chunk is sorted by length (longest
    first; ties keep their shuffled order), cut into global batches, and those batches are shuffled (seeded by
    ``seed`` and ``epoch``) so the long ones do not all come first. Only the final chunk may end in a partial
    batch, and it stays last. So the result is a permutation of ``order`` whose global batches sit at multiples
    of ``global_batch`` from position 0: every optimizer step still takes the next contiguous block of the
    order, and the batch a step sees depends on the global batch size, not on how it is split over ranks and
    micro-batches. Within a batch the examples stay sorted, so each rank's micro-batches are alike in length too.
    """
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1 to group by length, got {global_batch}")
    gen = torch.Generator().manual_seed(_mix(seed, "length-groups", epoch))
    span = global_batch * max(1, chunk_batches)
    grouped: list[int] = []
    for begin in range(0, len(order), span):
        chunk = sorted(order[begin : begin + span], key=lambda i: -lengths[i])
        full = len(chunk) // global_batch
        for b in torch.randperm(full, generator=gen).tolist():
            grouped.extend(chunk[b * global_batch : (b + 1) * global_batch])
        grouped.extend(chunk[full * global_batch :])
    return grouped


def example_lengths(dataset: Any) -> list[int]:
    """Tokens in each row of ``dataset`` (a :class:`datasets.Dataset` or a sequence of rows with ``input_ids``).

    A ``datasets.Dataset`` is measured in Arrow (list lengths), without turning its token lists into Python.
    """
    if isinstance(dataset, datasets.Dataset):
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(column).to_pylist()
    return [len(row["input_ids"]) for row in dataset]


def label_count(labels: Sequence[int]) -> int:
    """Labels other than -100: the tokens an example trains on (the data cache's ``num_tokens``)."""
    return sum(label != IGNORE_INDEX for label in labels)


def example_label_counts(dataset: Any) -> list[int]:
    """Labelled tokens (labels other than -100) in each row: the ``num_tokens`` column the data cache keeps,
    or counted from ``labels``."""
    if isinstance(dataset, datasets.Dataset) and "num_tokens" in dataset.column_names:
        return dataset.with_format("arrow")[:]["num_tokens"].to_pylist()
    return [label_count(row["labels"]) for row in dataset]


def rank_indices(
    n: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    start: int = 0,
    lengths: Sequence[int] | None = None,
    global_batch: int = 0,
) -> list[int]:
    """This rank's examples for ``epoch``, from global position ``start`` of the epoch's order on:
    ``rest = epoch_order(...)[start:]``, then ``rest[: len(rest) - len(rest) % world_size][rank::world_size]``.

    Every rank gets the same number of examples (so all ranks take the same number of steps and no
    collective waits forever) and the shards are disjoint; up to ``world_size - 1`` examples, different ones
    each epoch, are left out. Interleaving (rather than contiguous blocks) makes a step on W ranks with micro
    batch b see exactly the examples a single process sees with micro batch W x b at the same step, and makes
    every optimizer step consume the next contiguous block of the order: a resumed run needs only ``start``
    (examples consumed so far this epoch), whatever its number of processes.

    ``lengths`` and ``global_batch`` (micro-batch x grad_accum x world size) group the order by length (see
    :func:`group_by_length`); the grouped order depends on the global batch size, so a resumed run must keep it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    rest = epoch_order(n, seed, epoch, lengths, global_batch)[start:]
    return rest[: len(rest) - len(rest) % world_size][rank::world_size]


def balanced_step_batches(
    n: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    lengths: Sequence[int],
    start: int = 0,
    group_lengths: Sequence[int] | None = None,
    labelled: Sequence[int] | None = None,
    cost: StepCost | None = None,
) -> Iterator[list[list[int]]]:
    """This rank's micro-batches, one list per optimizer step, with each step's examples split over ranks and
    micro-batches by tokens instead of by count (``data.balance_tokens``).

    Every step takes the same contiguous block of the epoch's order as the count split does (``global batch =
    micro_batch_size x grad_accum x world_size`` examples; the order as in :func:`rank_indices`, grouped by
    ``group_lengths`` when given), so the examples of a step depend on the global batch only: a resumed run and
    1 rank x 2b still see what 2 ranks x b see. Only their placement changes (:func:`.balance.split_by_tokens`,
    with ``labelled`` tokens per example and the model's ``cost``); the loss is normalised over the whole global
    batch, so the gradient is the same.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    global_batch = micro_batch_size * grad_accum * world_size
    rest = epoch_order(n, seed, epoch, group_lengths, global_batch)[start:]
    rest = rest[: len(rest) - len(rest) % world_size]
    for begin in range(0, len(rest), global_batch):
        yield split_by_tokens(rest[begin : begin + global_batch], lengths, world_size, grad_accum, labelled, cost)[rank]


def examples_in_step(n: int, start: int, global_batch: int, world_size: int) -> int:
    """How many examples of the epoch's order the optimizer step at position ``start`` consumes: the global
    batch, or what is left of the epoch (cut to a multiple of the world size), whichever is smaller. The same
    for the count split and the token-balanced one, whose ranks take different numbers of examples."""
    rest = max(0, n - start)
    return min(global_batch, rest - rest % world_size)


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``rows`` to the longest one and stack them into ``torch.long`` tensors.

    Unpacked rows give ``input_ids``, ``labels`` (``-100`` on padding) and ``attention_mask``. Packed rows
    (they have ``position_ids``) give ``input_ids``, ``labels`` and ``position_ids`` and deliberately no
    ``attention_mask``: with ``attention_mask=None`` transformers' mask builder (``masking_utils``,
    ``find_packed_sequence_indices``) reads sequence starts from the position ids and builds the
    block-diagonal causal mask for sdpa/eager/flex attention. Padding continues the last example's positions,
    so it joins that example, which never attends to it (causal) and takes no loss on it (``-100``).

    The model must be called with ``use_cache=False`` on packed batches: transformers only looks for packed
    sequences when no cache is passed, and with the config's default ``use_cache=True`` it creates one.
    flash-attention kernels only detect packing for a batch of one row.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    packed = "position_ids" in rows[0]
    if any(("position_ids" in r) != packed for r in rows):
        raise ValueError("cannot mix packed and unpacked rows in one batch")
    width = max(len(r["input_ids"]) for r in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros(shape, dtype=torch.long)  # attention_mask, or position_ids when packed
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        if packed:
            positions = torch.as_tensor(row["position_ids"], dtype=torch.long)
            extra[i, :n] = positions
            start = int(positions[-1]) + 1 if n else 0
            extra[i, n:] = torch.arange(start, start + width - n)
        else:
            extra[i, :n] = 1
    if packed:
        # No attention_mask for packed rows (see above); the non-pad token count travels separately, for
        # tokens/s. It is not a model input.
        real = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": extra, "real_tokens": real}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": extra}
