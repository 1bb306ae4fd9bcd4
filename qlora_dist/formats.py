"""Data formats as registered builders: how one row becomes token ids and loss labels.

The built-ins (``alpaca``, ``chat``, ``completion``, ``text``) live in :mod:`qlora_dist.data` and register
themselves with :func:`data_format`. A third-party package adds one with an entry point::

    # pyproject.toml of the plugin package
    [project.entry-points."qlora_dist.formats"]
    qa = "my_package:QA_FORMAT"

    # my_package/__init__.py
    from qlora_dist.formats import DataFormat

    def tokenize_qa(row, tokenizer):
        prompt = tokenizer(f"Q: {row['question']}\\nA: ")["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt + answer, [-100] * len(prompt) + answer

    QA_FORMAT = DataFormat(columns=("question", "answer"), tokenize=tokenize_qa)

and a run selects it with ``data.format: qa``. ``tokenize`` returns ``(input_ids, labels)`` for one row, labels
-100 where no loss is taken; qlora_dist truncates, caches, shards and packs the result like any built-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .registry import Registry

BUILTIN_FORMATS = ("chat", "alpaca", "completion", "text")
"""Built-in format names, in the order ``data.format: auto`` tries them."""


@dataclass(frozen=True)
class DataFormat:
    columns: tuple[str, ...]
    """Columns every row must have."""
    tokenize: Callable[[dict[str, Any], Any], tuple[list[int], list[int]]]
    """``tokenize(row, tokenizer) -> (input_ids, labels)``, untruncated."""
    needs_chat_template: bool = False
    """True when rows are rendered with the tokenizer's chat template (checked before tokenizing)."""
    validate: Callable[[dict[str, Any]], None] | None = None
    """Cheap check of one row without tokenizing (``qlora-dist check``); raises ValueError/TypeError/KeyError
    saying what is wrong. By default the columns must be present and not null."""

    def check_row(self, row: dict[str, Any]) -> None:
        if self.validate is not None:
            self.validate(row)
            return
        for column in self.columns:
            if row.get(column) is None:
                raise ValueError(f"field {column!r} is missing or null")


FORMATS: Registry[DataFormat] = Registry("formats")


def data_format(name: str, columns: tuple[str, ...], needs_chat_template: bool = False, validate=None):
    """Decorator registering ``tokenize(row, tokenizer)`` as the data format ``name``."""

    def decorator(tokenize):
        FORMATS.register(name, DataFormat(tuple(columns), tokenize, needs_chat_template, validate))
        return tokenize

    return decorator


def get_format(name: str) -> DataFormat:
    """The format registered as ``name`` (built-ins are registered by importing :mod:`qlora_dist.data`)."""
    from . import data  # noqa: F401  (registers the built-ins)

    return FORMATS.get(name)
