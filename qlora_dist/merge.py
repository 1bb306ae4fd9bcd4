"""Rank-0 merge: fold the trained LoRA adapter into a full-precision copy of the base and save it.

By default (``merge_base: dequantized``) the adapter is merged into the base *dequantized from the same NF4
weights it was trained against*, never re-quantized: the adapter learned to correct that base, so the merged
model reproduces the QLoRA model's outputs. ``original`` merges into the unquantized checkpoint instead
(closer to the original model, but no longer equal to what was trained).

The merged folder is written under a temporary name and renamed into place, so there is never a
half-written ``merged/``.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def dequantized_base_weights(
    model: nn.Module, dtype: torch.dtype, gathered=None, keep: bool = True
) -> dict[str, torch.Tensor]:
    """``{base weight name: dequantized weight on CPU}`` for every 4-bit layer of ``model`` (peft or plain).

    Names are those of the plain base checkpoint (peft's ``base_model.model.`` prefix and ``.base_layer``
    removed), so they index a freshly loaded unquantized model directly. ``gathered(params)`` makes a
    ZeRO-3-sharded weight whole; under ZeRO-3 every rank calls this (one layer gathered at a time) and only
    the one with ``keep`` stores the result.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from .model import base_param_name

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            with gathered([w]) if gathered is not None else nullcontext():
                if keep:
                    dense = F.dequantize_4bit(w.data, w.quant_state)
                    out[base_param_name(name + ".weight")] = dense.to("cpu", dtype)
    return out


def load_merge_base(
    base_path: str, dtype: torch.dtype, dequantized: dict[str, torch.Tensor] | None, trust_remote_code: bool = False
) -> nn.Module:
    """The unquantized base in ``dtype`` on CPU; its 4-bit layers replaced by ``dequantized`` when given."""
    from transformers import AutoModelForCausalLM

    with _without_zero3_init():
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if dequantized:
        params = dict(model.named_parameters())
        missing = sorted(set(dequantized) - set(params))
        if missing:
            raise RuntimeError(f"dequantized weights do not match the base checkpoint: {missing[:3]}")
        with torch.no_grad():
            for name, weight in dequantized.items():
                params[name].copy_(weight.reshape(params[name].shape))
    return model


def merge_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load the saved adapter onto ``base`` with peft and fold it into the weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


@torch.no_grad()
def logits_of(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 CPU logits of ``model`` for each batch of token ids (under ZeRO-3, every rank must call this)."""
    device = _device_of(model)
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in batches]


def relative_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """``||candidate - reference|| / ||reference||`` over all tensors together."""
    num = sum(float((c - r).pow(2).sum()) for r, c in zip(reference, candidate, strict=True))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return (num / den) ** 0.5 if den > 0 else 0.0


def save_atomically(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Save safetensors shards and the tokenizer to ``out_dir`` through a temporary folder and a rename."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def merge_trained(
    adapter_dir: Path,
    dequantized: dict[str, torch.Tensor] | None,
    base_path: str,
    out_dir: Path,
    dtype: torch.dtype,
    tokenizer: Any,
    check_batches: list[torch.Tensor],
    reference_logits: list[torch.Tensor],
    trust_remote_code: bool = False,
    rank: int = 0,
) -> dict[str, Any]:
    """Merge on the calling (main) process and verify against the QLoRA model's logits.

    ``dequantized`` holds the trained-against NF4 weights dequantized (``merge_base: dequantized``), or is
    None to merge into the original weights. ``reference_logits`` are the QLoRA model's (NF4 base + adapter)
    logits on ``check_batches``, computed before the merge. Returns ``run_report.json``'s ``merge`` section.
    """
    start = time.perf_counter()
    merged = merge_adapter(load_merge_base(base_path, dtype, dequantized, trust_remote_code), adapter_dir)
    merged.eval()
    error = relative_error(reference_logits, logits_of(merged, check_batches)) if check_batches else None
    save_atomically(merged, tokenizer, out_dir)
    seconds = time.perf_counter() - start
    base = "dequantized" if dequantized is not None else "original"
    log.info(
        "rank %d merged the adapter into the %s base (%s) in %.1fs; relative logit error %s",
        rank, base, dtype, seconds, error,
    )  # fmt: skip
    return {
        "merged_by_rank": rank,
        "base": base,
        "dtype": str(dtype).replace("torch.", ""),
        "rel_logit_error": error,
        "checked_sequences": sum(int(b.shape[0]) for b in check_batches),
        "seconds": round(seconds, 3),
        "path": str(out_dir),
    }


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


QUANT_META = "qlora_dist.json"
"""File beside a saved adapter recording the 4-bit settings it was trained against (read by a later merge)."""


def merge_command(base: str, adapter: str, out: Path, merge_base: str, dtype_name: str) -> dict[str, Any]:
    """``qlora-dist merge``: merge an adapter (trained here or elsewhere) into its base, without training state.

    For ``dequantized`` the base is quantized with the settings recorded beside the adapter (NF4 with double
    quantization when there are none), on a GPU when there is one, then dequantized, as in training.
    """
    import json

    from transformers import AutoTokenizer

    from .config import ModelConfig, QuantConfig
    from .errors import UserError
    from .model import check_model_path, load_quantized_model, resolve_dtype

    check_model_path(ModelConfig(name_or_path=base))
    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there (expected a peft adapter folder)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder exists and is not empty; choose a new folder")
    meta_path = adapter_dir / QUANT_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if merge_base == "dequantized" and not meta:
        log.warning("%s has no %s: assuming NF4 with double quantization", adapter_dir, QUANT_META)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = resolve_dtype(meta.get("compute_dtype", "auto"), device)
    dtype = compute if dtype_name == "auto" else resolve_dtype(dtype_name, device)
    start = time.perf_counter()
    dequantized = None
    if merge_base == "dequantized":
        quantized = load_quantized_model(
            ModelConfig(name_or_path=base), QuantConfig(**meta.get("quant", {})), device, compute
        )
        dequantized = dequantized_base_weights(quantized, dtype)
        del quantized
    merged = merge_adapter(load_merge_base(base, dtype, dequantized), adapter_dir)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
    save_atomically(merged, AutoTokenizer.from_pretrained(tok_source), out)
    info = {
        "base": merge_base,
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": round(time.perf_counter() - start, 3),
    }
    log.info("merged %s into %s (%s base, %s) -> %s", adapter_dir, base, merge_base, info["dtype"], out)
    return info
