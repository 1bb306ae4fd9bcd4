"""Rank-0 merge: fold the trained LoRA adapter into a full-precision copy of the base and save it.

By default (``merge_base: dequantized``) the adapter is merged into the base *dequantized from the same NF4
weights it was trained against*, never re-quantized: the adapter learned to correct that base, so the merged
model reproduces the QLoRA model's outputs. ``original`` merges into the unquantized checkpoint instead
(closer to the original model, but no longer equal to what was trained).

Two ways to get there, with bit-identical results:

- **streaming** (the default whenever the base is a local safetensors checkpoint and the adapter plain LoRA):
  the base's safetensors files are read one tensor at a time (safetensors' ``safe_open``, opened per tensor:
  see :func:`_read_tensor`). Each weight that training quantized is cast the
  way transformers casts it before quantizing (to the compute dtype, on the training device), quantized with
  bitsandbytes' ``quantize_4bit`` (same block size, quant type, double quantization and storage dtype) and
  dequantized, so it equals what the adapter saw; the LoRA delta is added with peft's own arithmetic
  (``(B @ A) * alpha/r`` in float32, added in place), and the tensor is written straight into its output
  shard (the output shards mirror the base's). Memory is a few copies of the largest tensor plus the
  adapter: the whole model is never in memory (BENCHMARKS.md, "Merge": 0.4 GB against 4.9 GB for a 1.1B
  model). A run on ZeRO-3 gathers nothing for it: the base comes from disk. After a training run the logit
  check then loads the merged folder once, on the training device, to compare with the QLoRA model.
- **in-memory** (the fallback: ``.bin`` checkpoints, adapters with DoRA, rank/alpha patterns,
  ``modules_to_save``, ...; or when the caller passes the dequantized weights): the whole unquantized base
  is loaded, the dequantized weights copied in, and peft's ``merge_and_unload`` folds the adapter in.

The merged folder is written under a temporary name and renamed into place, so there is never a
half-written ``merged/``. Before the rename, its logits and its next-token loss (taken by the training loss
function, :func:`qlora_dist.loss.token_loss_sum`) are compared with base + adapter unmerged (training's merge and
``qlora-dist merge`` alike); over :data:`MERGE_BOUNDS` or :data:`LOSS_BOUNDS` the folder is dropped, not kept. GPT-2's Conv1D
weights are (in, out) in the checkpoint and (out, in) in the 4-bit layer: both paths write them back transposed
(``quant/layers.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import re
import shutil
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fsutil import fsync_dir, fsync_file

log = logging.getLogger(__name__)

QUANT_META = "qlora_dist.json"
"""File beside a saved adapter recording the 4-bit settings it was trained against (read by a later merge)."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class NF4Rebuild:
    """How training quantized the base: all a merge needs to rebuild those 4-bit weights, bit for bit, from the
    unquantized checkpoint (``merge_base: dequantized``) without the trained model's own copy of them.

    ``layers`` are the base names of the quantized weights (``model.layers.0.mlp.up_proj.weight``, ...), taken
    from the trained model when there is one; None derives them from the checkpoint's config the way
    transformers does when it loads with a ``BitsAndBytesConfig``.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    storage_dtype: torch.dtype = torch.uint8
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    blocksize: int = 64
    """bitsandbytes' ``Params4bit`` default, which transformers' ``Linear4bit`` layers use."""
    layers: frozenset[str] | None = None
    cache: Path | None = None
    """A quantize-once cache folder of this base with these settings (:mod:`qlora_dist.base_cache`): its packed
    weights are the very bits :meth:`roundtrip` would compute, so the streaming merge dequantizes them instead
    of quantizing again (bitsandbytes' quantizer is most of a CPU merge's time)."""

    @classmethod
    def of(cls, quant, compute_dtype: torch.dtype, device: torch.device | str, model: nn.Module | None = None):
        """From a run's ``QuantConfig`` and compute dtype and the device it quantized on; with ``model`` (the
        trained one, peft-wrapped or not, any strategy: nothing is gathered) its 4-bit layer names and block size."""
        from .model import _DTYPES

        storage = "uint8" if quant.storage_dtype == "auto" else quant.storage_dtype
        layers, blocksizes = quantized_layers(model) if model is not None else (None, set())
        if len(blocksizes) > 1:
            raise RuntimeError(f"4-bit layers with different block sizes: {sorted(blocksizes)}")
        blocksize = next(iter(blocksizes), 64)
        return cls(
            quant_type=quant.quant_type,
            double_quant=quant.double_quant,
            storage_dtype=_DTYPES[storage],
            compute_dtype=compute_dtype,
            device=torch.device(device),
            blocksize=blocksize,
            layers=frozenset(layers) if layers is not None else None,
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any], device: torch.device) -> NF4Rebuild:
        """From the ``qlora_dist.json`` written beside an adapter (NF4 + double quantization when it is empty)."""
        from .config import QuantConfig
        from .model import resolve_dtype

        quant = QuantConfig(**meta.get("quant", {}))
        return cls.of(quant, resolve_dtype(meta.get("compute_dtype", "auto"), device), device)

    def quant_config(self):
        """These settings as the run config's ``QuantConfig`` (for loading the base in 4 bits)."""
        from .config import QuantConfig
        from .model import _DTYPES

        storage = next(name for name, dtype in _DTYPES.items() if dtype == self.storage_dtype)
        return QuantConfig(quant_type=self.quant_type, double_quant=self.double_quant, storage_dtype=storage)

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` quantized to 4 bits and dequantized, exactly as the training run's layer held it.

        transformers casts a checkpoint tensor to the ``dtype`` given to ``from_pretrained`` (the compute dtype)
        on its target device, then ``Params4bit`` quantizes it there with these settings; the result is in the
        compute dtype on that device.
        """
        import bitsandbytes.functional as F

        w = weight.to(device=self.device, dtype=self.compute_dtype)
        packed, state = F.quantize_4bit(
            w.contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=self.storage_dtype,
        )
        del w
        return F.dequantize_4bit(packed, state)


def quantized_layers(model: nn.Module) -> tuple[set[str], set[int]]:
    """Base names of the weights of ``model``'s 4-bit layers, and the block sizes they were quantized with."""
    import bitsandbytes as bnb

    from .model import base_param_name
    from .quant import moe

    names, blocksizes = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            names.add(base_param_name(name + ".weight"))
            blocksizes.add(int(getattr(module.weight, "blocksize", None) or 64))
        elif isinstance(module, moe.NF4Experts):
            names.update(base_param_name(f"{name}.{m}") for m in moe.EXPERT_MATRICES)
            blocksizes.add(moe.BLOCKSIZE)
    return names, blocksizes


def dequantized_base_weights(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{base weight name: dequantized weight on CPU}`` for every 4-bit layer of ``model`` (peft or plain).

    Names are those of the plain base checkpoint (peft's ``base_model.model.`` prefix and ``.base_layer``
    removed), so they index a freshly loaded unquantized model directly. This is the in-memory merge's input
    (whole weights on one process); the streaming merge rebuilds each weight from the checkpoint instead.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from .model import base_param_name
    from .quant import moe

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            out[base_param_name(name + ".weight")] = F.dequantize_4bit(w.data, w.quant_state).to("cpu", dtype)
        elif isinstance(module, moe.NF4Experts):  # fused experts, dequantized expert by expert
            for m in moe.EXPERT_MATRICES:
                out[base_param_name(f"{name}.{m}")] = module.dequantized(m).to("cpu", dtype)
    return out


def load_merge_base(
    base_path: str, dtype: torch.dtype, dequantized: dict[str, torch.Tensor] | None, trust_remote_code: bool = False
) -> nn.Module:
    """The unquantized base in ``dtype`` on CPU; its 4-bit layers replaced by ``dequantized`` when given."""
    from transformers import AutoModelForCausalLM

    with _without_zero3_init():
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if dequantized:
        from .quant.layers import conv1d_weights

        params = dict(model.named_parameters())
        missing = sorted(set(dequantized) - set(params))
        if missing:
            raise RuntimeError(f"dequantized weights do not match the base checkpoint: {missing[:3]}")
        transposed = conv1d_weights(model)
        with torch.no_grad():
            for name, weight in dequantized.items():
                # A 4-bit layer holds (out, in); a Conv1D weight is (in, out): transpose, never reshape.
                weight = weight.t() if name in transposed else weight
                if tuple(weight.shape) != tuple(params[name].shape):
                    raise RuntimeError(
                        f"{name}: dequantized weight {tuple(weight.shape)} for a weight of {tuple(params[name].shape)}"
                    )
                params[name].copy_(weight)
    return model


def merge_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load the saved adapter onto ``base`` with peft and fold it into the weights; then the per-expert LoRA
    of NF4 experts (which peft does not know) into the fused expert tensors."""
    from peft import PeftModel

    from .quant import moe

    # peft re-targets MoE adapters written for transformers 4 at the fused experts; one of ours (trained on
    # NF4 experts, targets resolved) must load as it was saved.
    ours = (Path(adapter_dir) / QUANT_META).is_file() or bool(moe.read_expert_lora(Path(adapter_dir)))
    with moe.without_peft_moe_remap() if ours else contextlib.nullcontext():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    moe.merge_expert_lora(merged, Path(adapter_dir))
    return merged


def rebuild_dequantized(
    base_path: str, nf4: NF4Rebuild, dtype: torch.dtype, trust_remote_code: bool = False
) -> dict[str, torch.Tensor]:
    """The in-memory way to the trained-against weights: load the base in 4 bits on ``nf4.device`` (this process
    alone, even inside a ZeRO-3 run) and dequantize every 4-bit layer to ``dtype`` on CPU."""
    from .config import ModelConfig
    from .model import load_quantized_model

    cfg = ModelConfig(name_or_path=base_path, trust_remote_code=trust_remote_code)
    with _without_zero3_init():
        quantized = load_quantized_model(cfg, nf4.quant_config(), nf4.device, nf4.compute_dtype)
    try:
        return dequantized_base_weights(quantized, dtype)
    finally:
        del quantized
        gc.collect()


@torch.no_grad()
def logits_of(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 CPU logits of ``model`` for each batch of token ids (under ZeRO-3, every rank must call this)."""
    device = _device_of(model)
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in batches]


@torch.no_grad()
def loss_of(model: nn.Module, batches: list[torch.Tensor], chunk_tokens: int | None = 0) -> float:
    """Mean next-token loss of ``model`` over every token of ``batches`` (each sequence is its own label), by
    :func:`qlora_dist.loss.token_loss_sum`: the function training and evaluation take their loss with
    (``chunk_tokens`` as there: 0 chunks over the tokens, the full logits never built; None takes the full
    logits). Under ZeRO-3, every rank must call this."""
    from .loss import target_count, token_loss_sum

    device = _device_of(model)
    total, tokens = 0.0, 0
    for ids in batches:
        batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
        total += float(token_loss_sum(model, batch, chunk_tokens))
        tokens += target_count(batch)
    return total / tokens if tokens else float("nan")


@dataclasses.dataclass
class MergeCheck:
    """What the merged model must reproduce: base + adapter, unmerged, on a few token sequences."""

    batches: list[torch.Tensor]
    logits: list[torch.Tensor]
    """Float32 CPU logits of base + adapter, one tensor per batch (:func:`logits_of`)."""
    loss: float | None
    """Its mean next-token loss (:func:`loss_of`); None: the loss is recorded for the merged model, not compared."""
    device: torch.device
    """Where the merged model is run for the comparison."""
    chunk_tokens: int | None = 0
    """:func:`loss_of`'s, the same for both losses (a run passes its ``train.loss_chunk_tokens``)."""

    def compare(self, merged: nn.Module) -> tuple[float, float]:
        """(relative logit error, mean next-token loss) of ``merged`` on these sequences."""
        error = relative_error(self.logits, logits_of(merged, self.batches))
        return error, loss_of(merged, self.batches, self.chunk_tokens)


def relative_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """``||candidate - reference|| / ||reference||`` over all tensors together."""
    num = sum(float((c - r).pow(2).sum()) for r, c in zip(reference, candidate, strict=True))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return (num / den) ** 0.5 if den > 0 else 0.0


def save_atomically(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Save safetensors shards and the tokenizer to ``out_dir`` through a temporary folder and a rename."""
    with staged(out_dir) as tmp:
        _save_in_memory(model, tokenizer, tmp)


# -- the streaming merge ------------------------------------------------------------------------------------


def streaming_blocker(
    base_path: str, adapter_dir: str | Path, nf4: NF4Rebuild | None = None, trust_remote_code: bool = False
) -> str | None:
    """Why ``base_path`` + ``adapter_dir`` cannot be merged by streaming (None when they can).

    Streaming needs the base as local safetensors files (``model.safetensors`` or an index with shards; a hub
    id is looked up in the local cache) holding every weight to re-quantize under its model name, and a plain
    LoRA adapter (``adapter_model.safetensors``; no DoRA, patterns, ``modules_to_save``, ...).
    """
    try:
        _plan(base_path, Path(adapter_dir), nf4, trust_remote_code)
    except _Unsupported as e:
        return str(e)
    return None


def stream_merge(
    base_path: str,
    adapter_dir: str | Path,
    out_dir: Path,
    dtype: torch.dtype,
    nf4: NF4Rebuild | None,
    trust_remote_code: bool = False,
) -> dict[str, int]:
    """Merge ``adapter_dir`` into the base shard by shard, writing safetensors shards, index, config and
    generation config into the (existing, empty) ``out_dir``. ``nf4`` rebuilds the trained-against 4-bit
    weights (``merge_base: dequantized``); None merges into the original weights. Returns counts.

    Raises RuntimeError when :func:`streaming_blocker` has a reason.
    """
    try:
        plan = _plan(base_path, Path(adapter_dir), nf4, trust_remote_code)
    except _Unsupported as e:
        raise RuntimeError(f"cannot stream this merge: {e}") from None
    return _stream(plan, out_dir, dtype, nf4)


class _Unsupported(Exception):
    """A base or adapter the streaming merge does not handle (the in-memory path does)."""


@dataclasses.dataclass
class _Plan:
    folder: Path
    files: list[Path]
    headers: dict[Path, dict[str, dict]]
    """``{shard: {tensor name: {"dtype": "BF16", "shape": [...]}}}``, each shard's tensors in file order."""
    deltas: dict[str, _Lora]
    quantized: frozenset[str]
    config: Any
    transposed: frozenset[str] = frozenset()
    """Weights the checkpoint stores (in, out), Conv1D-style, while 4-bit layers and LoRA deltas are (out, in)."""


def _plan(base_path: str, adapter_dir: Path, nf4: NF4Rebuild | None, trust_remote_code: bool) -> _Plan:
    """Everything the streaming merge needs before it writes a byte; raises _Unsupported otherwise."""
    from transformers import AutoConfig

    found = _safetensors_files(base_path)
    if found is None:
        raise _Unsupported(f"{base_path} has no safetensors checkpoint ({SAFE_SINGLE} or {SAFE_INDEX})")
    folder, files = found
    deltas = _read_lora(adapter_dir)
    headers = {f: _tensor_index(f) for f in files}
    names = {name for header in headers.values() for name in header}
    unknown = {info["dtype"] for header in headers.values() for info in header.values()} - set(_ST_DTYPES)
    if unknown:
        raise _Unsupported(f"{base_path} holds tensors of dtype {', '.join(sorted(unknown))}")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quantized: frozenset[str] = frozenset()
    if nf4 is not None:
        quantized = frozenset(
            nf4.layers if nf4.layers is not None else quantized_weights_of_config(config, nf4, trust_remote_code)
        )
    fused = sorted(n for n in quantized if n.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") and ".experts." in n)
    if fused:
        # A checkpoint's experts may be stored per expert (Mixtral's w1/w3/w2) or fused; either way they were
        # quantized one expert at a time, which this per-tensor rebuild does not do.
        raise _Unsupported(f"NF4 experts ({fused[0]}, ...) are rebuilt and merged in memory")
    for what, wanted in (("4-bit layers", quantized), ("LoRA targets", deltas)):
        missing = sorted(set(wanted) - names)
        if missing:
            raise _Unsupported(f"{what} without a weight of that name in the checkpoint: {', '.join(missing[:3])}")
    return _Plan(folder, files, headers, deltas, quantized, config, frozenset(_conv1d_weights_of_config(config)))


def _conv1d_weights_of_config(config) -> set[str]:
    """Conv1D weights of a model of ``config`` (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    from .quant.layers import conv1d_weights, plain_linear_layers

    with _without_zero3_init(), torch.device("meta"), plain_linear_layers(config.model_type):
        return conv1d_weights(AutoModelForCausalLM.from_config(config))


def _stream(plan: _Plan, out_dir: Path, dtype: torch.dtype, nf4: NF4Rebuild | None) -> dict[str, int]:
    """Output shards mirror the input's (same file names and tensors), floating tensors in ``dtype``. Every
    tensor goes read -> (re-quantize) -> cast -> add delta -> write before the next one is read. A 4-bit weight
    the quantize-once cache holds is read from there, packed, and dequantized (the same bits)."""
    weight_map, total = {}, 0
    cached = _CachedNF4.open(nf4.cache) if nf4 is not None and nf4.cache is not None else None
    for file, header in plan.headers.items():
        entries = [(name, _output_dtype(info, dtype), info["shape"], info) for name, info in header.items()]
        # Widest dtypes first keeps every tensor aligned to its element size (what the safetensors writer does);
        # within a dtype, file order (the header is in it; the sort is stable), so the input is read front to back.
        entries.sort(key=lambda e: -e[1].itemsize)

        def produce(name: str, info: dict, file=file) -> torch.Tensor:
            lora, transposed = plan.deltas.get(name), name in plan.transposed
            if name in plan.quantized and cached is not None and cached.has(name):
                rebuilt = cached.dequantized(name, nf4.device).to("cpu", dtype)  # (out, in), as roundtrip's
                return _merged_tensor(name, rebuilt, dtype, None, lora, transposed, already_out_in=True)
            tensor = _read_tensor(file, name)
            rebuild = nf4 if name in plan.quantized else None
            return _merged_tensor(name, tensor, dtype, rebuild, lora, transposed)

        total += _write_safetensors(out_dir / file.name, entries, produce)
        weight_map.update({name: file.name for name, *_ in entries})
    if len(plan.files) > 1 or (plan.folder / SAFE_INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _save_configs(plan.config, plan.folder, out_dir, dtype)
    return {
        "tensors": len(weight_map),
        "quantized": len(plan.quantized),
        "merged": len(plan.deltas),
        "shards": len(plan.files),
        "from_cache": cached.used if cached is not None else 0,
    }


_QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class _CachedNF4:
    """The packed NF4 weights of a quantize-once cache folder, read one weight (and its quantization state) at
    a time through ``safe_open`` and dequantized by bitsandbytes."""

    def __init__(self, where: dict[str, Path], states: dict[str, list[str]]) -> None:
        self.where, self.states, self.used = where, states, 0

    @classmethod
    def open(cls, folder: Path) -> _CachedNF4 | None:
        from safetensors import safe_open

        from .base_cache import COMPLETE

        if not (folder / COMPLETE).is_file():
            return None
        where: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                where.update({key: file for key in f.keys()})  # noqa: SIM118 (safe_open is not a mapping)
        # Each 4-bit weight's state tensors, grouped once: ``<weight>.quant_state.bitsandbytes__nf4`` and
        # ``<weight>.absmax`` / ``quant_map`` / ``nested_absmax`` / ``nested_quant_map`` (bitsandbytes' names).
        states: dict[str, list[str]] = {}
        for key in where:
            owner, sep, _ = key.partition(".quant_state.")
            if not sep:
                owner, _, last = key.rpartition(".")
                if last not in _QUANT_STATE_PARTS:
                    continue
            states.setdefault(owner, []).append(key)
        return cls(where, {w: keys for w, keys in states.items() if any(".quant_state." in k for k in keys)})

    def has(self, name: str) -> bool:
        return name in self.where and name in self.states

    def dequantized(self, name: str, device: torch.device) -> torch.Tensor:
        import bitsandbytes.functional as F
        from safetensors import safe_open

        def read(key: str) -> torch.Tensor:
            with safe_open(self.where[key], framework="pt") as f:
                return f.get_tensor(key).clone()  # off the memory map before the file closes

        state = F.QuantState.from_dict({k[len(name) + 1 :]: read(k) for k in self.states[name]}, device)
        self.used += 1
        return F.dequantize_4bit(read(name).to(device), state)


def _output_dtype(info: dict, dtype: torch.dtype) -> torch.dtype:
    """Floating tensors are merged in ``dtype`` (as ``from_pretrained(dtype=...)`` loads them); others keep theirs."""
    source = _ST_DTYPES[info["dtype"]]
    return dtype if source.is_floating_point else source


@torch.no_grad()
def _merged_tensor(
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    nf4: NF4Rebuild | None,
    lora: _Lora | None,
    transposed: bool = False,
    already_out_in: bool = False,
) -> torch.Tensor:
    """One output tensor, computed exactly as the in-memory path computes it.

    In-memory: the dequantized weight (compute dtype, on the quantizing device) goes ``.to("cpu", dtype)`` and
    is copied into the base loaded in ``dtype``; peft then adds its delta in place on the CPU. Everything else is
    the checkpoint tensor loaded in ``dtype``. A ``transposed`` (Conv1D) weight is turned to (out, in) first, as
    transformers does before quantizing it, and written back in the checkpoint's (in, out).
    """
    if transposed and not already_out_in:
        tensor = tensor.t()
    if nf4 is not None:
        tensor = nf4.roundtrip(tensor).to("cpu", dtype)
    elif tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if lora is not None:
        if tuple(lora.shape) != tuple(tensor.shape):
            raise RuntimeError(f"{name}: LoRA delta of shape {lora.shape} for a weight of shape {tuple(tensor.shape)}")
        tensor += lora.delta()
    return tensor.t().contiguous() if transposed else tensor


@dataclasses.dataclass
class _Lora:
    """One layer's LoRA pair as peft holds it after ``PeftModel.from_pretrained``: float32 on the CPU (peft
    upcasts bfloat16/float16 adapter weights; float32 ones are loaded as they are)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> torch.Tensor:
        # peft's LoraLayer.get_delta_weight: (B @ A) * scaling, fan_in_fan_out=False, in the weights' dtype.
        return (self.B @ self.A) * self.scaling


def _read_lora(adapter_dir: Path) -> dict[str, _Lora]:
    """``{base weight name: LoRA pair}`` from a saved plain-LoRA adapter; raises _Unsupported otherwise."""
    from safetensors.torch import load_file

    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise _Unsupported(f"{adapter_dir} has no {ADAPTER_CONFIG}")
    if not weights_path.is_file():
        raise _Unsupported(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    cfg = json.loads(config_path.read_text())
    features = {
        "peft_type other than LORA": cfg.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(cfg.get("use_dora")),
        "lora_bias": bool(cfg.get("lora_bias")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "layer_replication": bool(cfg.get("layer_replication")),
    }
    used = [k for k, v in features.items() if v]
    if used:
        raise _Unsupported(f"adapter uses {', '.join(used)}")
    r, alpha = int(cfg["r"]), cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r  # peft's LoraLayer.update_layer
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise _Unsupported(f"adapter weight {key} is not a LoRA A/B matrix of a linear layer")
        pairs.setdefault(match.group(1) + ".weight", {})[match.group(2)] = tensor.to(torch.float32)
    out = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise _Unsupported(f"adapter has only half a LoRA pair for {name}")
        if pair["A"].shape[0] != r or pair["B"].shape[1] != r:
            raise _Unsupported(f"adapter rank of {name} differs from r={r}")
        out[name] = _Lora(pair["A"].contiguous(), pair["B"].contiguous(), scaling)
    return out


def quantized_weights_of_config(config, nf4: NF4Rebuild, trust_remote_code: bool = False) -> set[str]:
    """The weights transformers quantizes when it loads a model of ``config`` with these 4-bit settings: the
    model is built on the meta device (no memory) and put through the bitsandbytes quantizer's own module
    replacement (every ``nn.Linear`` except the output head and the modules it keeps unquantized)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from .quant.coverage import quantize_meta
    from .quant.layers import plain_linear_layers

    with _without_zero3_init(), torch.device("meta"), plain_linear_layers(config.model_type):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    from .quant import moe

    experts = moe.fused_experts(model)
    if experts:  # qlora_dist quantizes these itself at load, expert by expert
        raise _Unsupported(f"{experts[0][0]} holds fused MoE experts, held in NF4 per expert: merged in memory")
    quantize_meta(model, nf4.quant_config(), nf4.compute_dtype)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            source = getattr(module, "source_cls", nn.Linear)
            if source is not nn.Linear and not issubclass(source, Conv1D):  # Conv1D: the plan transposes it
                raise _Unsupported(f"{name} is a quantized {source.__name__}: only nn.Linear and Conv1D are supported")
            names.add(name + ".weight")
    return names


def _save_configs(config, base_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json (dtype set to the merged one), generation_config.json and any remote code, as
    ``save_pretrained`` of the in-memory merged model writes them."""
    from transformers import GenerationConfig

    config.dtype = dtype
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out_dir)
    if getattr(config, "auto_map", None):
        for code in base_dir.glob("*.py"):
            shutil.copy2(code, out_dir / code.name)


# -- safetensors, one tensor at a time ----------------------------------------------------------------------
# Reading goes through safetensors' own lazy access (``safe_open``: the tensor index in file order, one tensor
# at a time). Writing is our own: the format is 8 bytes little-endian header length, a JSON header {name:
# {dtype, shape, data_offsets}} (padded with spaces), then the raw bytes, and writing the header first (shapes
# and dtypes are known) lets each tensor go to disk as soon as it is computed, which safetensors' writer (a
# dict of finished tensors) does not.

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _safetensors_files(base_path: str) -> tuple[Path, list[Path]] | None:
    """(folder, shard files in order) of a safetensors checkpoint, or None when there is none."""
    folder = _local_model_dir(base_path)
    if folder is None:
        return None
    index = folder / SAFE_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    elif (folder / SAFE_SINGLE).is_file():
        files = [folder / SAFE_SINGLE]
    else:
        return None
    if not all(f.is_file() for f in files):
        return None
    return folder, files


def _local_model_dir(base_path: str) -> Path | None:
    """The folder holding the checkpoint: ``base_path`` itself, or a hub id's snapshot in the local cache."""
    p = Path(base_path).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_path, local_files_only=True))
    except Exception:  # not a hub id, or not cached: the in-memory path will say what is wrong
        return None


def _tensor_index(path: Path) -> dict[str, dict]:
    """``{name: {"dtype": "BF16", "shape": [...]}}`` of a safetensors file, in the order of the tensors' bytes in
    the file (safetensors' ``offset_keys``), so that reading in this order reads the file front to back."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {
            name: {"dtype": (s := f.get_slice(name)).get_dtype(), "shape": list(s.get_shape())}
            for name in f.offset_keys()
        }


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of the safetensors file ``path``, through safetensors' lazy per-tensor access.

    The file is opened for this one tensor: ``safe_open`` maps the file and ``get_tensor`` returns a tensor
    over the mapped pages (copy-on-write: the in-place LoRA add never reaches the file), and mapped pages that
    were read count in the resident set while the mapping lives. Kept open for a whole shard, every page read so
    far stayed mapped: on issue 14's 0.5B base in 200 MB shards the peak RSS rose by 0.16 GB (0.87 against
    0.71 GB, CPU time the same); opened per tensor, the mapping goes with the tensor and the peak equals plain
    reads into a fresh buffer (0.69-0.74 GB either way; BENCHMARKS.md, "Merge, 0.5B"). The header is parsed
    again each time: a few hundred tensors per shard, microseconds each.
    """
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def _write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, list[int], Any]], produce) -> int:
    """Write a safetensors file of ``entries`` (name, dtype, shape, what ``produce`` needs), each tensor coming
    from ``produce(name, payload)`` only when its turn comes; returns the bytes of tensor data.

    One background thread writes tensor i while ``produce`` computes tensor i+1 (file writes and torch ops
    both release the GIL), so at most two output tensors are alive at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as writer:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        pending = None
        for name, dtype, shape, payload in entries:
            tensor = produce(name, payload)
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, expected {dtype} {shape}")
            data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor
            if pending is not None:
                pending.result()  # in order, and never more than one tensor waiting
            pending = writer.submit(f.write, data)
        if pending is not None:
            pending.result()
    return offset


# -- both paths: staging, verification, the two entry points ------------------------------------------------

MERGE_BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
"""Largest relative logit error of a merged model against base + adapter, by the merged model's dtype: fp32
merges reproduce to ~1e-6, so 1e-4 catches any layout or arithmetic mistake; half precision rounds each
weight to 8 or 11 mantissa bits, ~1e-2 in the logits of the tiny models."""


LOSS_BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
"""Largest difference of the merged model's mean next-token loss from base + adapter's, relative to the latter,
by dtype (:func:`loss_bound`). The loss is what training minimised and evaluation reports (both losses are taken
by the same function, ``token_loss_sum``), so this says in the units a user reads that the merged model is the
trained one. Why these values: a token's cross-entropy moves by at most sqrt(2) times the norm of its logits'
change (its gradient, softmax minus one-hot, has norm <= sqrt(2)), and rounding errors of the logits mostly
cancel in the mean over tokens. Measured on the tests' tiny Llama and Qwen2: correct merges differ by <= 2e-8
relative in fp32 and <= 4e-6 in bf16/fp16 (logits by 1e-2); a real bf16 model, whose logits are larger, was
estimated at ~1e-3, so 1e-2 leaves room without refusing good merges. An output head written 3x too large moves
the loss by 0.7-1.8e-2 (caught in fp32 by a 70x margin; in half precision the logit bound catches it). Noise
on every merged weight that makes the logits 100% wrong moved this near-uniform tiny model's loss by only
3e-4 to 6e-3: the logit comparison stays the sharper check, the loss the one in a user's units."""


class MergeCheckFailed(RuntimeError):
    """The merged model does not reproduce base + adapter within :data:`MERGE_BOUNDS` (logits) or
    :data:`LOSS_BOUNDS` (the next-token loss); nothing was kept."""

    def __init__(
        self,
        error: float,
        bound: float,
        dtype: torch.dtype,
        method: str,
        losses: tuple[float | None, float | None, float | None] = (None, None, None),
    ) -> None:
        self.error, self.bound, self.dtype, self.method = error, bound, dtype, method
        self.reference_loss, self.merged_loss, self.loss_bound = losses
        what = f"merged model ({method} merge, {str(dtype).replace('torch.', '')}) differs from base + adapter by"
        failures = []
        if not error <= bound:
            failures.append(f"a relative logit error of {error:.3g}, over the bound {bound:g}")
        if not _loss_within(*losses):
            failures.append(
                f"a next-token loss of {self.merged_loss:.6g} against {self.reference_loss:.6g}, "
                f"over the bound of {self.loss_bound:.3g}"
            )
        super().__init__(f"{what} {' and '.join(failures)}")


def merge_bound(*dtypes: torch.dtype) -> float:
    """The logit-error bound for a merge in the merged model's dtype whose reference logits were computed in the
    other given dtype (the compute dtype): the looser of their bounds."""
    return max(MERGE_BOUNDS.get(d, MERGE_BOUNDS[torch.bfloat16]) for d in dtypes)


def loss_bound(reference_loss: float, *dtypes: torch.dtype) -> float:
    """Largest allowed ``|merged loss - reference loss|`` in nats (:data:`LOSS_BOUNDS`, the looser of the dtypes'
    relative bounds, times the reference loss)."""
    return max(LOSS_BOUNDS.get(d, LOSS_BOUNDS[torch.bfloat16]) for d in dtypes) * abs(reference_loss)


def _loss_within(reference: float | None, merged: float | None, bound: float | None) -> bool:
    if reference is None or bound is None:
        return True  # not compared
    return merged is not None and abs(merged - reference) <= bound  # NaN fails


def check_bound(
    error: float | None,
    bound: float,
    dtype: torch.dtype,
    method: str,
    losses: tuple[float | None, float | None, float | None] = (None, None, None),
) -> None:
    """Raise :class:`MergeCheckFailed` when ``error`` (None: not checked) exceeds ``bound``, or the merged loss
    differs from the reference one by more than its bound (``losses = (reference, merged, bound)``)."""
    if error is not None and (not error <= bound or not _loss_within(*losses)):  # NaN fails too
        raise MergeCheckFailed(error, bound, dtype, method, losses)


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``out_dir`` that replaces ``out_dir`` (by renames) when the block succeeds
    and is removed when it fails, so ``out_dir`` is never half-written."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):  # the data is on disk before the rename makes it visible
            if file.is_file():
                fsync_file(file)
        fsync_dir(tmp)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _save_in_memory(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@dataclasses.dataclass
class CheckResult:
    """The merged model against :class:`MergeCheck`: its logit error and both losses."""

    rel_logit_error: float
    merged_loss: float
    reference_loss: float | None
    loss_bound: float | None
    """In nats (:func:`loss_bound`); None when the loss is not bounded (the original base, or no reference loss)."""

    def report(self) -> dict[str, Any]:
        """The loss figures as ``merge_report.json`` and ``run_report.json``'s ``merge`` section record them."""
        difference = None if self.reference_loss is None else self.merged_loss - self.reference_loss
        return {
            "reference_loss": self.reference_loss,
            "merged_loss": self.merged_loss,
            "loss_difference": difference,
            "loss_bound": self.loss_bound,
        }


NO_CHECK_REPORT = {"reference_loss": None, "merged_loss": None, "loss_difference": None, "loss_bound": None}


def _merge_into(
    folder: Path,
    adapter_dir: Path,
    base_spec: dict[str, torch.Tensor] | NF4Rebuild | None,
    base_path: str,
    dtype: torch.dtype,
    tokenizer: Any,
    trust_remote_code: bool,
    check: MergeCheck | None = None,
    method: str = "auto",
    bounds: tuple[torch.dtype, ...] | None = None,
) -> tuple[str, CheckResult | None]:
    """Merge into the empty ``folder`` by streaming when possible (``method="auto"``), else in memory; return
    (method used, the merged model against ``check``, None without a check).
    ``method="in-memory"`` forces the in-memory path; ``"streaming"`` raises when streaming is impossible.
    With ``bounds`` (the dtypes that set :func:`merge_bound` and :func:`loss_bound`; None: not bounded) a merged
    model over either bound raises :class:`MergeCheckFailed` (the folder is then dropped)."""
    if method not in ("auto", "streaming", "in-memory"):
        raise ValueError(f"method={method!r}: choose auto, streaming or in-memory")
    blocker = "dequantized weights given in memory" if isinstance(base_spec, dict) else None
    blocker = blocker or ("in-memory merge requested" if method == "in-memory" else None)
    if blocker is None:
        try:
            plan = _plan(base_path, adapter_dir, base_spec, trust_remote_code)
        except _Unsupported as e:
            blocker = str(e)
    if blocker is not None and method == "streaming":
        raise RuntimeError(f"cannot stream this merge: {blocker}")
    if blocker is None:
        counts = _stream(plan, folder, dtype, base_spec)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        log.info(
            "streamed %d tensors in %d shard(s): %d 4-bit (%d of them from the quantize-once cache), %d with a "
            "LoRA delta", counts["tensors"], counts["shards"], counts["quantized"], counts["from_cache"],
            counts["merged"],
        )  # fmt: skip
        result = _check_saved(folder, dtype, check, bounds, trust_remote_code) if check else None
        _enforce(result, bounds, dtype, "streaming")
        return "streaming", result
    if not isinstance(base_spec, dict):
        log.info("merging in memory: %s", blocker)
    dequantized = base_spec
    if isinstance(base_spec, NF4Rebuild):
        dequantized = rebuild_dequantized(base_path, base_spec, dtype, trust_remote_code)
    merged = merge_adapter(load_merge_base(base_path, dtype, dequantized, trust_remote_code), adapter_dir)
    del dequantized
    merged.eval()
    result = _check(merged, check, bounds) if check else None
    _enforce(result, bounds, dtype, "in-memory")  # before a byte is written
    _save_in_memory(merged, tokenizer, folder)
    return "in-memory", result


def _check(merged: nn.Module, check: MergeCheck, bounds: tuple[torch.dtype, ...] | None) -> CheckResult:
    # Evaluation only: a head with requires_grad would make token_loss_sum fall back to the full logits,
    # and the point is to take the loss the way training did.
    merged.requires_grad_(False)
    error, loss = check.compare(merged)
    limit = loss_bound(check.loss, *bounds) if bounds is not None and check.loss is not None else None
    return CheckResult(error, loss, check.loss, limit)


def _enforce(result: CheckResult | None, bounds, dtype: torch.dtype, method: str) -> None:
    if result is not None and bounds is not None:
        losses = (result.reference_loss, result.merged_loss, result.loss_bound)
        check_bound(result.rel_logit_error, merge_bound(*bounds), dtype, method, losses)


def _check_saved(
    folder: Path, dtype: torch.dtype, check: MergeCheck, bounds: tuple[torch.dtype, ...] | None, trust_remote_code
) -> CheckResult:
    """The merged model saved in ``folder`` against ``check``.

    This loads the merged model once, on the check's device (the training device: on a GPU the shards go
    straight to GPU memory, not host RAM), and frees it again: the one moment the whole merged model is in
    memory, after the merge itself. Pass no check batches to skip it for a model that does not fit.
    """
    from transformers import AutoModelForCausalLM

    with _without_zero3_init():
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map={"": check.device}, trust_remote_code=trust_remote_code
        )
    model.eval()
    try:
        return _check(model, check, bounds)
    finally:
        del model
        gc.collect()


def merge_trained(
    adapter_dir: Path,
    dequantized: dict[str, torch.Tensor] | NF4Rebuild | None,
    base_path: str,
    out_dir: Path,
    dtype: torch.dtype,
    tokenizer: Any,
    check_batches: list[torch.Tensor],
    reference_logits: list[torch.Tensor],
    trust_remote_code: bool = False,
    rank: int = 0,
    check_device: torch.device | str = "cpu",
    reference_dtype: torch.dtype | None = None,
    reference_loss: float | None = None,
    chunk_tokens: int | None = 0,
) -> dict[str, Any]:
    """Merge on the calling (main) process and verify against the QLoRA model's logits and loss.

    ``dequantized`` says which base: an :class:`NF4Rebuild` (``merge_base: dequantized``, rebuilt from the
    checkpoint: streaming, nothing gathered), the trained-against NF4 weights already dequantized (a dict: the
    in-memory path), or None to merge into the original weights. ``reference_logits`` and ``reference_loss``
    are the QLoRA model's (NF4 base + adapter) on ``check_batches`` (:func:`logits_of`, :func:`loss_of`),
    computed before the merge; the merged model is compared on ``check_device``; ``reference_dtype`` is the
    dtype they were computed in (default ``dtype``), which with ``dtype`` sets the bounds (:func:`merge_bound`,
    :func:`loss_bound`); ``chunk_tokens`` is the run's loss chunking, for the merged model's loss. Returns
    ``run_report.json``'s ``merge`` section.

    Into the dequantized base, a logit error over :data:`MERGE_BOUNDS` or a loss over :data:`LOSS_BOUNDS`
    leaves no ``merged/`` and the section says ``verified: false`` with ``path: null`` (the caller fails the
    run). Into the original weights the merged model differs from the QLoRA one by the quantization error
    itself, so the error and the losses are reported, not bounded.
    """
    start = time.perf_counter()
    base = "original" if dequantized is None else "dequantized"
    check = None
    if check_batches:
        check = MergeCheck(check_batches, reference_logits, reference_loss, torch.device(check_device), chunk_tokens)
    bounds = (dtype, reference_dtype or dtype) if base == "dequantized" else None
    failed: MergeCheckFailed | None = None
    result: CheckResult | None = None
    try:
        with staged(Path(out_dir)) as tmp:
            method, result = _merge_into(
                tmp, Path(adapter_dir), dequantized, base_path, dtype, tokenizer, trust_remote_code, check,
                bounds=bounds,
            )  # fmt: skip
    except MergeCheckFailed as e:
        failed, method = e, e.method
        result = CheckResult(e.error, e.merged_loss, e.reference_loss, e.loss_bound)
        log.error("%s: %s not written", e, out_dir)
    seconds = time.perf_counter() - start
    error = result.rel_logit_error if result is not None else None
    verified = base == "dequantized" and result is not None and failed is None
    if not verified and failed is None:
        log.warning(
            "merged model NOT verified against base + adapter (%s)",
            "no check sequences" if error is None else "original base: it differs from the QLoRA model by design",
        )
    log.info(
        "rank %d merged the adapter into the %s base (%s, %s) in %.1fs; relative logit error %s, loss %s -> %s",
        rank, base, dtype, method, seconds, error, reference_loss, result.merged_loss if result else None,
    )  # fmt: skip
    return {
        "merged_by_rank": rank,
        "base": base,
        "method": method,
        "dtype": str(dtype).replace("torch.", ""),
        "rel_logit_error": error,
        "bound": merge_bound(*bounds) if bounds is not None else None,
        **(result.report() if result is not None else NO_CHECK_REPORT),
        "verified": verified,
        "checked_sequences": sum(int(b.shape[0]) for b in check_batches),
        "seconds": round(seconds, 3),
        "path": None if failed else str(out_dir),
    }


def _cache_of(base: str, meta: dict[str, Any], nf4: NF4Rebuild) -> Path | None:
    """The quantize-once cache folder a run with the recorded settings left for ``base`` on this machine, if
    any (the run's ``quant.cache_dir``, else the default folder; ``storage_dtype`` as recorded and resolved)."""
    from .base_cache import COMPLETE, cache_key
    from .config import QuantConfig
    from .plugin import default_cache_dir

    folder = Path(base).expanduser()
    if not folder.is_dir():
        return None
    recorded = QuantConfig(**meta.get("quant", {}))
    root = Path(recorded.cache_dir).expanduser() if recorded.cache_dir else default_cache_dir() / "nf4"
    for quant in (recorded, nf4.quant_config()):
        candidate = root / cache_key(folder, quant, nf4.compute_dtype, nf4.device)
        if (candidate / COMPLETE).is_file():
            return candidate
    return None


def merge_command(
    base: str,
    adapter: str,
    out: Path,
    merge_base: str,
    dtype_name: str,
    method: str = "auto",
    verify: bool = True,
    data: str | None = None,
) -> dict[str, Any]:
    """``qlora-dist merge``: merge an adapter (trained here or elsewhere) into its base, without training state.

    For ``dequantized`` the base is quantized with the settings recorded beside the adapter (NF4 with double
    quantization when there are none), on a GPU when there is one, then dequantized, as in training.
    ``dtype_name="auto"`` writes the base checkpoint's own dtype (:func:`checkpoint_dtype`; the recorded compute
    dtype when its config does not say). Streams
    shard by shard when the base is in safetensors (see :func:`streaming_blocker`), else merges in memory;
    ``method`` (``auto`` | ``streaming`` | ``in-memory``) forces one of them (benchmarks, tests).

    ``verify`` (the default) compares the merged model's logits with base + adapter unmerged (the NF4 base for
    ``dequantized``, the original weights for ``original``) on a few sequences: from ``data`` (a data file the
    run formats read) when given, else token ids drawn at random (seeded) from the vocabulary. Over the bound
    of :data:`MERGE_BOUNDS` nothing is left at ``out`` and a UserError says so; the result is written into the
    merged folder as ``merge_report.json`` either way it is kept. Returns that report.
    """
    from transformers import AutoTokenizer

    from .errors import UserError
    from .model import check_not_prequantized, resolve_dtype

    _check_base_arg(base)
    adapter_dir = Path(adapter)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there (expected a peft adapter folder)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder exists and is not empty; choose a new folder")
    if Path(base).expanduser().is_dir():
        check_not_prequantized(Path(base).expanduser() / "config.json")
    meta_path = adapter_dir / QUANT_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if merge_base == "dequantized" and not meta:
        log.warning("%s has no %s: assuming NF4 with double quantization", adapter_dir, QUANT_META)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nf4 = NF4Rebuild.from_meta(meta, device) if merge_base == "dequantized" else None
    if nf4 is not None:
        nf4 = dataclasses.replace(nf4, cache=_cache_of(base, meta, nf4))
    compute = resolve_dtype(meta.get("compute_dtype", "auto"), device)
    dtype = (checkpoint_dtype(base) or compute) if dtype_name == "auto" else resolve_dtype(dtype_name, device)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer saved with the merged model (%s: %s)", tok_source, str(e).splitlines()[0])
        tokenizer = None
    start = time.perf_counter()
    check = None
    if verify:
        batches = check_sequences(base, tokenizer, data)
        logits, loss = reference_outputs(base, adapter_dir, nf4, compute, device, batches)
        check = MergeCheck(batches, logits, loss, device)
    else:
        log.warning("--no-verify: the merged model is NOT compared with base + adapter")
    bounds = (dtype, compute)
    try:
        with staged(out) as tmp:
            method, result = _merge_into(
                tmp, adapter_dir, nf4, base, dtype, tokenizer, False, check, method=method, bounds=bounds
            )
            error = result.rel_logit_error if result is not None else None
            info = {
                "base": merge_base,
                "method": method,
                "dtype": str(dtype).replace("torch.", ""),
                "verified": result is not None,
                "rel_logit_error": error,
                "bound": merge_bound(*bounds),
                **(result.report() if result is not None else NO_CHECK_REPORT),
                "reference": ("NF4 base" if nf4 is not None else "original base") + " + adapter, unmerged",
                "checked_sequences": sum(int(b.shape[0]) for b in check.batches) if check else 0,
                "check_data": data if check else None,
                "seconds": round(time.perf_counter() - start, 3),
            }
            (tmp / MERGE_REPORT).write_text(json.dumps(info, indent=2) + "\n")
    except MergeCheckFailed as e:
        raise UserError(
            f"{e}: nothing written to --out {out}; the adapter or base do not match (see --debug)"
        ) from None
    error_text = "not verified"
    if result is not None:
        error_text = (
            f"relative logit error {error:.2e} (bound {info['bound']:g}); next-token loss {result.merged_loss:.6g}"
            f" against {result.reference_loss:.6g} unmerged (bound {result.loss_bound:.2g})"
        )
    log.info(
        "merged %s into %s (%s base, %s, %s) -> %s; %s",
        adapter_dir,
        base,
        merge_base,
        info["dtype"],
        method,
        out,
        error_text,
    )
    return info


def checkpoint_dtype(base_path: str) -> torch.dtype | None:
    """The dtype the base checkpoint is stored in, from its config.json (``dtype``, or the older
    ``torch_dtype``): what ``merge_dtype: auto`` writes, so the merged model is the size of the base (a bf16
    base merged in the CPU's float32 compute dtype would double). None when the config does not say."""
    folder = _local_model_dir(base_path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


MERGE_REPORT = "merge_report.json"
"""What ``qlora-dist merge`` verified, written into the merged folder."""


def check_sequences(
    base: str, tokenizer: Any, data: str | None, count: int = 4, length: int = 32
) -> list[torch.Tensor]:
    """A few token sequences, one per batch: the first ``count`` rows of ``data`` tokenized as a run would
    (format picked from the columns), else ids drawn (seed 0) from the tokenizer's vocabulary (the config's
    ``vocab_size`` without a tokenizer)."""
    from .errors import UserError

    if data is not None:
        if tokenizer is None:
            raise UserError(f"--data {data}: no tokenizer beside the adapter or the base to tokenize it with")
        from .data import check_rows, load_rows, tokenize_example

        rows = load_rows(data)
        fmt = check_rows(rows, "auto", data)
        ids = [tokenize_example(rows[i], fmt, tokenizer, 4 * length)["input_ids"] for i in range(min(count, len(rows)))]
        return [torch.tensor([x]) for x in ids if x]
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(base).get_text_config().vocab_size)
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(count)]


def reference_outputs(
    base: str,
    adapter_dir: Path,
    nf4: NF4Rebuild | None,
    compute_dtype: torch.dtype,
    device: torch.device,
    batches: list[torch.Tensor],
) -> tuple[list[torch.Tensor], float]:
    """Logits and mean next-token loss of base + adapter, unmerged (what the merged model must reproduce): the
    base quantized as ``nf4`` says (the QLoRA model), or in its original weights when ``nf4`` is None. Freed
    before returning."""
    from transformers import AutoModelForCausalLM

    from .config import ModelConfig
    from .model import load_quantized_model
    from .quant import moe

    if nf4 is not None:
        model = load_quantized_model(ModelConfig(name_or_path=base), nf4.quant_config(), device, nf4.compute_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype, device_map={"": device})
    try:
        model = moe.load_adapter(model, adapter_dir).eval()  # with the expert LoRA of a mixture of experts
        model.requires_grad_(False)  # as after training: the loss is taken the way training took it (chunked)
        return logits_of(model, batches), loss_of(model, batches)
    finally:
        del model
        gc.collect()


def _check_base_arg(base: str) -> None:
    from .errors import UserError

    p = Path(base).expanduser()
    if p.is_file():
        raise UserError(f"--base {base}: expected a model folder, found a file")
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"--base {base}: folder has no config.json (is it a model folder?)")
    looks_like_hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~"))
    if not p.exists() and not looks_like_hub_id:
        raise UserError(f"--base {base}: no such folder")


@contextmanager
def _without_zero3_init():
    """Load a plain model on this process alone, even inside a ZeRO-3 run.

    accelerate registers the run's DeepSpeed config with transformers, which then builds every model under
    ``zero.Init``: a collective. Rank 0 merges after the other ranks have left, so it must not partition.
    """
    import transformers.integrations.deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
