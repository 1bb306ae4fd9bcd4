"""Run configs: *what to train*, as typed nested dataclasses.

A run config is one YAML file with the sections ``model``, ``quant``, ``lora``, ``data``, ``train`` and
``output``, plus ``section.key=value`` overrides given after it on the command line. Loading is strict:
an unknown key, a value of the wrong type or one out of range raises :class:`ConfigError` naming the key
and what is allowed, before anything heavy is imported or loaded.

Values are coerced by the field's declared type, because YAML is loose about types (PyYAML reads ``3e-4``
as a string and ``1e-3`` likewise) and overrides arrive as strings.

*Where and how to distribute* (processes, machines, DeepSpeed) is not here: that is accelerate's launch
config, kept in ``launch_configs/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

DType = Literal["auto", "bfloat16", "float16", "float32"]
Optimizer = Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"]


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Local folder (or hub id, where a hub is reachable) of the base model."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its source."""
    tokenizer: str | None = None
    """Tokenizer folder, if it is not beside the model."""

    def validate(self) -> None:
        if not self.name_or_path:
            raise ConfigError(
                "model.name_or_path is required: a local model folder, e.g. model.name_or_path=./my-llama"
            )
        self.name_or_path = _expand(self.name_or_path)
        self.tokenizer = _expand(self.tokenizer) if self.tokenizer else self.tokenizer


@dataclass
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base. NF4 is QLoRA's."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: DType = "auto"
    """dtype the 4-bit layers compute in: ``auto`` is bfloat16 on a GPU, float32 on a CPU."""
    storage_dtype: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """dtype the packed 4-bit weights are stored in: ``auto`` is uint8, or the compute dtype under ZeRO-3
    (which can only partition the weights in that dtype)."""
    cache: bool = True
    """Quantize once per machine: the local main process saves the packed 4-bit base, every rank and every
    later run with the same base files and settings loads it (bit-identical; not under ZeRO-3)."""
    cache_dir: str = ""
    """Where the quantized bases are kept; empty is ``$QLORA_DIST_CACHE/nf4`` (``~/.cache/qlora_dist/nf4``)."""
    allow_unquantized: bool = False
    """Train even when less than half of the decoder weights can be held in 4-bit (a family bitsandbytes does
    not quantize, e.g. one whose linear layers are a class of their own): the run is then not QLoRA, and ``run_report.json`` says so."""


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the adapter matrices."""
    alpha: float = 32.0
    """Scale numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    target_modules: str | list[str] = "all-linear"
    """``all-linear`` (every linear layer but the output head) or a list of module names, e.g. [q_proj, v_proj]."""

    def validate(self) -> None:
        _check_range("lora.r", self.r, low=1)
        _check_range("lora.alpha", self.alpha, low=0.0, low_inclusive=False)
        _check_range("lora.dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules is empty: use all-linear or a list of module names")


@dataclass
class DataSource:
    """One of several data sets a run mixes (``data.datasets``)."""

    path: str = ""
    """A .jsonl/.json/.csv/.parquet file, or a folder written by ``datasets``' ``save_to_disk``."""
    format: str = "auto"
    """This source's format: auto | chat | alpaca | completion | text, or a format plugin's name."""
    weight: float = 1.0
    """How many times each of this source's training examples is used per epoch, on average: 1 = each once,
    2 = each twice, 0.5 = a seeded half of them."""


@dataclass
class DataConfig:
    path: str = ""
    """A .jsonl/.json/.csv/.parquet file, or a folder written by ``datasets``' ``save_to_disk``."""
    datasets: list[DataSource] = field(default_factory=list)
    """Several sources instead of ``path``: a list of {path, format, weight}, mixed into one training set."""
    format: str = "auto"
    """How rows become token sequences: auto (picked from the columns) | chat | alpaca | completion | text, or
    the name of an installed format plugin."""
    max_length: int = 1024
    """Examples are truncated to this many tokens (packed sequences are this long at most)."""
    packing: bool = False
    """Pack several examples into one sequence (no attention across example boundaries)."""
    group_by_length: bool = False
    """Put examples of similar length in the same batch (less padding when not packing); the order stays seeded."""
    balance_tokens: bool = True
    """Split each optimizer step's examples over ranks and micro-batches by predicted work (padded tokens,
    attention, labelled tokens), not by count, so no rank waits for one that pads to a longer example; the
    examples of each step stay the same (ranks may run up to twice grad_accum, smaller, micro-batches)."""
    eval_fraction: float = 0.0
    """Share of examples held out for the eval loss (0 disables eval)."""

    def validate(self) -> None:
        if self.path and self.datasets:
            raise ConfigError(
                "data.path and data.datasets are both set: give one file as data.path, or every source as a "
                "data.datasets entry {path, format, weight}"
            )
        if not self.path and not self.datasets:
            raise ConfigError(
                "data.path is required: a .jsonl/.json/.csv/.parquet file or a save_to_disk folder "
                "(or data.datasets: a list of {path, format, weight})"
            )
        _check_range("data.max_length", self.max_length, low=8)
        if self.path:
            self.path = _expand(self.path)
            _check_format("data.format", self.format)
        for i, source in enumerate(self.datasets):
            if not source.path:
                raise ConfigError(f"data.datasets[{i}].path is required: a data file or a save_to_disk folder")
            source.path = _expand(source.path)
            _check_format(f"data.datasets[{i}].format", source.format)
            _check_range(f"data.datasets[{i}].weight", source.weight, low=0.0, low_inclusive=False, high=100.0)
        _check_range("data.eval_fraction", self.eval_fraction, low=0.0, high=0.5)

    def sources(self) -> list[DataSource]:
        """The run's data sources: ``data.datasets``, or ``data.path`` as the only one (weight 1)."""
        return list(self.datasets) or [DataSource(path=self.path, format=self.format, weight=1.0)]


def _check_format(key: str, fmt: str) -> None:
    from .formats import BUILTIN_FORMATS, FORMATS

    known = ("auto", *BUILTIN_FORMATS)
    if fmt not in known and ":" not in fmt and fmt not in FORMATS.names():
        allowed = " | ".join((*known, *[n for n in FORMATS.names() if n not in known]))
        raise ConfigError(
            f"{key}={fmt!r} is not allowed: choose one of {allowed} "
            "(or install a format plugin, see `qlora-dist plugins`)"
        )


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means run ``epochs`` full epochs."""
    micro_batch_size: int = 4
    """Sequences per process per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = micro_batch_size x grad_accum x processes."""
    lr: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.03
    """Share of the optimizer steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 42
    """Seeds the adapter init, dropout and the data order (a new order each epoch)."""
    optimizer: Optimizer = "paged_adamw_8bit"
    """bitsandbytes paged/8-bit AdamW, or torch's AdamW."""
    strategy: str = "auto"
    """Distribution strategy: auto (follow the launch config) | ddp | zero2 | zero3 | fsdp2 (must agree with the launch
    config), or the name of an installed strategy plugin."""
    callbacks: list[str] = field(default_factory=list)
    """Callbacks on training events, by name: built-in (stop_on_nan), installed plugins, or package.module:attr."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant) to save memory."""
    chunked_loss: bool = True
    """Take the loss from the final hidden states in chunks, never holding the full-vocabulary logits (false:
    the model's own full logits)."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the chunked loss; 0 picks it from the vocabulary size (about 64 MiB of float32
    logits per chunk)."""
    eval_steps: int = 0
    """Evaluate every this many optimizer steps (0: only at the end). Needs data.eval_fraction > 0."""
    log_steps: int = 1
    """Write a metrics.jsonl line every this many optimizer steps."""
    save_steps: int = 100
    """Checkpoint every this many optimizer steps (0: only at the end and on preemption)."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the newest complete checkpoint in output.dir; ``never``: start over."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers, through accelerate: tensorboard | wandb | mlflow | trackio | aim | comet_ml | clearml |
    dvclive | swanlab (each needs its package: pip install 'qlora-dist[tensorboard]' etc.)."""
    run_name: str = ""
    """The run's name in the trackers (default: the output folder's name)."""
    project: str = "qlora-dist"
    """The trackers' project (W&B project, MLflow experiment, TensorBoard folder under output.dir/runs/)."""
    progress_steps: int = 10
    """When the output is not a terminal, print a progress line every this many optimizer steps."""

    def validate(self) -> None:
        _check_range("train.epochs", self.epochs, low=1)
        _check_range("train.max_steps", self.max_steps, low=0)
        _check_range("train.micro_batch_size", self.micro_batch_size, low=1)
        _check_range("train.grad_accum", self.grad_accum, low=1)
        _check_range("train.lr", self.lr, low=0.0, low_inclusive=False, high=1.0)
        _check_range("train.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        _check_range("train.weight_decay", self.weight_decay, low=0.0)
        _check_range("train.max_grad_norm", self.max_grad_norm, low=0.0)
        _check_range("train.loss_chunk_tokens", self.loss_chunk_tokens, low=0)
        _check_range("train.eval_steps", self.eval_steps, low=0)
        _check_range("train.log_steps", self.log_steps, low=1)
        _check_range("train.save_steps", self.save_steps, low=0)
        _check_range("train.progress_steps", self.progress_steps, low=1)
        from .trackers import check_tracker_names

        check_tracker_names(self.report_to)
        from .strategies import check_strategy_name

        check_strategy_name(self.strategy)


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    """Where the adapter, merged model, metrics and report go."""
    merge: bool = True
    """After training, rank 0 merges the adapter into the base and writes ``merged/``."""
    merge_base: Literal["dequantized", "original"] = "dequantized"
    """Merge into the base dequantized from the NF4 weights the adapter was trained against, or into the
    original unquantized weights."""
    merge_dtype: DType = "auto"
    """dtype of the merged model; ``auto`` is the base checkpoint's own (its config.json ``dtype``), else the
    compute dtype."""
    overwrite: bool = False
    """Allow writing into an output folder that already holds a finished run, or start over where checkpoints
    exist (they are then deleted; without it a checkpoint is never deleted on doubt)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in ``checkpoints/``; older ones are deleted after a new one is in place."""

    def validate(self) -> None:
        _check_range("output.keep_checkpoints", self.keep_checkpoints, low=1)
        self.dir = _expand(self.dir)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> RunConfig:
        """Check every section and the rules that span sections; returns self so calls chain."""
        for section in dataclasses.fields(self):
            check = getattr(getattr(self, section.name), "validate", None)
            if check is not None:
                check()
        if self.train.eval_steps and not self.data.eval_fraction:
            raise ConfigError(
                f"train.eval_steps={self.train.eval_steps} needs held-out data: set data.eval_fraction (e.g. 0.05) "
                "or train.eval_steps=0"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """Build a validated :class:`RunConfig` from a YAML file, a dict, and ``section.key=value`` overrides.

    Later sources win: ``base`` < file < overrides.
    """
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw = _merge(raw, read_yaml(path))
    for item in overrides or []:
        raw = _merge(raw, parse_override(item))
    return from_dict(raw).validate()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax errors into :class:`ConfigError` with file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model, quant, lora, data, train, output)")
    return data


def parse_override(item: str) -> dict[str, Any]:
    """``train.lr=3e-4`` -> ``{"train": {"lr": "3e-4"}}`` (the value is typed later, by its field)."""
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"bad override {item!r}: expected section.key=value, e.g. train.lr=3e-4")
    section, _, name = key.strip().partition(".")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return {section: {name: parsed}}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a nested dict, rejecting unknown keys and coercing values by field type."""
    return _build(RunConfig, raw, prefix="")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}: allowed keys in {where} are {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = coerce(key, value, tp)
    return cls(**kwargs)


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the type ``tp`` or raise a ConfigError naming ``key`` and what is allowed."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed: choose one of {' | '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item_tp):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key} must be a list of mappings, got {value!r}")
            return [_build(item_tp, v, prefix=f"{key}[{i}].") for i, v in enumerate(value)]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}={value!r} is not a boolean: use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}={value!r} is not a number")
        if not math.isfinite(number):  # NaN compares false with every bound, so a range check lets it through
            raise ConfigError(f"{key}={value!r} is not a finite number: give a number such as 1e-4")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise TypeError(f"unsupported config field type for {key}: {tp!r}")


def _expand(path: str) -> str:
    """``~`` and ``$VARS`` in a path (a shell leaves ``key=~/x`` arguments unexpanded)."""
    return os.path.expandvars(os.path.expanduser(path)) if path.startswith(("~", "$")) else path


def _check_range(
    key: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    too_low = low is not None and (value < low or (not low_inclusive and value == low))
    too_high = high is not None and (value > high or (not high_inclusive and value == high))
    if too_low or too_high:
        lo = "" if low is None else f"{'>=' if low_inclusive else '>'} {low}"
        hi = "" if high is None else f"{'<=' if high_inclusive else '<'} {high}"
        allowed = " and ".join(x for x in (lo, hi) if x)
        raise ConfigError(f"{key}={value} is out of range: must be {allowed}")
