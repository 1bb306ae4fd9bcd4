"""How much of a base is really held in 4-bit, measured on the model itself, and the rule that refuses a base
that is not QLoRA.

bitsandbytes quantizes only the layers transformers replaces by ``Linear4bit``. A family whose weights live
elsewhere (Falcon's own linear class before :mod:`qlora_dist.quant.layers` handled it, fused 3-D MoE expert
parameters) trains a LoRA on a mostly full-precision base while every setting still says NF4. So the share is
measured, never assumed:

- :func:`measure` reads a loaded model (plain or peft-wrapped, any strategy): a parameter counts as 4-bit when
  it is a ``bitsandbytes.nn.Params4bit`` or carries a bitsandbytes ``QuantState`` in ``quant_state``.
- :func:`predict` reads the model built from ``config.json`` on the meta device and put through the
  bitsandbytes quantizer's own module replacement (no weights): what ``check`` and ``plan`` print, and what the
  refusal runs on before any weight is loaded. :data:`PREDICTORS` lets other weight formats (NF4 experts) say
  which meta parameters their loading will hold in 4-bit.

The rule (:func:`refusal`): at least :data:`MIN_FRACTION` of the *decoder weights* (every parameter of two or
more dimensions except embeddings and the output head; by elements, which is by bytes in the checkpoint's one
dtype) must be 4-bit, unless ``quant.allow_unquantized`` says to train anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

MIN_FRACTION = 0.5
"""Least share of the decoder weights held in 4-bit for a run to count as QLoRA."""

PREDICTORS: list[Callable[[nn.Module], Iterable[str]]] = []
"""Extra rules for the meta-device prediction: each takes the meta model (after the quantizer's module
replacement) and returns names of parameters that loading will hold in 4-bit although they are not in a
``Linear4bit`` (e.g. fused MoE experts once their loading quantizes them). Append with :func:`register_predictor`."""


def register_predictor(fn: Callable[[nn.Module], Iterable[str]]) -> Callable[[nn.Module], Iterable[str]]:
    """Add ``fn`` to :data:`PREDICTORS` (once); usable as a decorator."""
    if fn not in PREDICTORS:
        PREDICTORS.append(fn)
    return fn


@dataclasses.dataclass
class Coverage:
    """Elements and bytes of a base, split into held-in-4-bit and not."""

    quantized_params: int = 0
    total_params: int = 0
    """Logical elements (a packed 4-bit weight counts as its unpacked shape) of every frozen base parameter."""
    quantized_bytes: int = 0
    total_bytes: int = 0
    """Bytes as held in memory (packed 4-bit data plus its quantization state counts for the 4-bit ones)."""
    decoder_quantized: int = 0
    decoder_total: int = 0
    """Elements of the decoder weights (2-D and up, embeddings and output head excluded): what the rule reads."""
    unquantized: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    """(name, elements, owning module class) of the decoder weights left in full precision, largest first."""
    other: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    """The same for the rest of the base not in 4-bit (embeddings, output head, norms, biases)."""

    @property
    def fraction(self) -> float:
        """Share of the decoder weights held in 4-bit (0 for a model without any)."""
        return self.decoder_quantized / self.decoder_total if self.decoder_total else 0.0

    def left_out_classes(self) -> list[str]:
        """Module classes owning unquantized decoder weights, largest share first."""
        size: dict[str, int] = {}
        for _, n, cls in self.unquantized:
            size[cls] = size.get(cls, 0) + n
        return sorted(size, key=lambda c: -size[c])

    def summary(self) -> str:
        """One line: the decoder share and the whole base's share by elements and by bytes."""
        return (
            f"{self.fraction:.1%} of the decoder weights in 4-bit; whole base {_share(self.quantized_params, self.total_params)}"
            f" of parameters, {_share(self.quantized_bytes, self.total_bytes)} of bytes held"
        )

    def to_report(self, allow_unquantized: bool, top: int = 5) -> dict[str, Any]:
        """``run_report.json``'s ``quantization`` section."""
        decoder = {n for n, _, _ in self.unquantized}
        return {
            "quantized_fraction": round(self.fraction, 6),
            "params_fraction": round(self.quantized_params / self.total_params, 6) if self.total_params else None,
            "bytes_fraction": round(self.quantized_bytes / self.total_bytes, 6) if self.total_bytes else None,
            "min_fraction": MIN_FRACTION,
            "allow_unquantized": allow_unquantized,
            "qlora": self.fraction >= MIN_FRACTION,
            "largest_unquantized": [
                {"name": n, "params": k, "module": c, "decoder_weight": n in decoder}
                for n, k, c in sorted(self.unquantized + self.other, key=lambda t: (-t[1], t[0]))[:top]
            ],
        }


def is_4bit(p: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit parameter, or one carrying a bitsandbytes ``QuantState`` (the project's own formats)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    return isinstance(p, bnb.nn.Params4bit) or isinstance(getattr(p, "quant_state", None), QuantState)


def measure(model: nn.Module, extra_4bit: Iterable[str] = (), held_bytes: Callable | None = None) -> Coverage:
    """The coverage of ``model``'s base (LoRA weights excluded). ``extra_4bit`` names more parameters
    to count as 4-bit and ``held_bytes(name, param, is_4bit)`` their bytes (the meta prediction's use)."""
    from ..model import _logical_numel, base_param_name

    extra = set(extra_4bit)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    if head is not None:
        skip_ids |= {id(p) for p in head.parameters(recurse=False)}
    cov = Coverage()
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or ".lora_" in f".{mname}.":  # the adapter is not the base
                continue
            seen.add(id(p))
            name = base_param_name(f"{mname}.{pname}" if mname else pname)
            quantized = is_4bit(p) or name in extra
            numel = _logical_numel(p)
            if held_bytes is not None:
                nbytes = held_bytes(name, p, quantized)
            else:
                held = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
                nbytes = held.numel() * held.element_size() + (_state_bytes(p) if quantized else 0)
            cov.total_params += numel
            cov.total_bytes += nbytes
            if quantized:
                cov.quantized_params += numel
                cov.quantized_bytes += nbytes
            if id(p) in skip_ids or _logical_dim(p) < 2:
                if not quantized:
                    cov.other.append((name, numel, type(module).__name__))
                continue
            cov.decoder_total += numel
            if quantized:
                cov.decoder_quantized += numel
            else:
                cov.unquantized.append((name, numel, type(module).__name__))
    cov.unquantized.sort(key=lambda t: (-t[1], t[0]))
    cov.other.sort(key=lambda t: (-t[1], t[0]))
    return cov


def predict(meta: nn.Module, quant, compute_dtype: torch.dtype) -> Coverage:
    """The coverage a 4-bit load of ``meta``'s config will have: ``meta`` (a meta-device model, changed in
    place) goes through the bitsandbytes quantizer's module replacement, then :data:`PREDICTORS` add theirs."""
    from ..plan import nf4_layer_bytes

    quantize_meta(meta, quant, compute_dtype)
    extra = {name for fn in PREDICTORS for name in fn(meta)}
    storage = quant.storage_dtype if quant.storage_dtype != "auto" else "uint8"
    storage_bytes = torch.empty(0, dtype=getattr(torch, storage)).element_size()
    compute_bytes = torch.empty(0, dtype=compute_dtype).element_size()

    def held_bytes(name: str, p: torch.Tensor, quantized: bool) -> int:
        if not quantized:
            return p.numel() * compute_bytes
        return sum(nf4_layer_bytes(p.numel(), quant.double_quant, storage_bytes).values())

    return measure(meta, extra, held_bytes)


def quantize_meta(meta: nn.Module, quant, compute_dtype: torch.dtype) -> nn.Module:
    """Replace ``meta``'s layers the way ``from_pretrained(quantization_config=...)`` does (no weights)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    from ..model import bnb_config

    if quant.storage_dtype == "auto":  # what the layer replacement needs of it is only that it is a dtype
        quant = dataclasses.replace(quant, storage_dtype="uint8")
    quantizer = AutoHfQuantizer.from_config(bnb_config(quant, compute_dtype), pre_quantized=False)
    quantizer.preprocess_model(model=meta, dtype=compute_dtype, device_map={"": "cpu"})
    return meta


def refusal(cov: Coverage, model_type: str) -> str | None:
    """Why a base with coverage ``cov`` is not QLoRA (None when it is): the share, the module classes left out
    and what to do."""
    if cov.fraction >= MIN_FRACTION:
        return None
    classes = cov.left_out_classes()
    fused = any("Expert" in c for c in classes)
    why = (
        "fused mixture-of-experts weights are not nn.Linear layers, so bitsandbytes leaves them in full precision"
        if fused
        else "bitsandbytes replaces only nn.Linear and Conv1D layers"
    )
    largest = ", ".join(n for n, _, _ in cov.unquantized[:2])
    return (
        f"{model_type}: only {cov.fraction:.0%} of the decoder weights would be 4-bit (QLoRA needs {MIN_FRACTION:.0%}): "
        f"{', '.join(classes[:3])} not quantized ({why}; largest: {largest}); set quant.allow_unquantized=true "
        "to train on this full-precision base anyway (the run report says so)"
    )


def _state_bytes(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    if state is None or not hasattr(state, "as_dict"):
        return 0
    return sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v))


def _logical_dim(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        return len(shape)
    if hasattr(p, "ds_shape"):
        return len(p.ds_shape)
    return p.dim()


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def require_qlora(cov: Coverage, model_type: str, allow_unquantized: bool, when: str) -> None:
    """Raise a UserError when ``cov`` is not QLoRA, unless ``allow_unquantized`` (then warn loudly)."""
    import logging

    from ..errors import UserError

    reason = refusal(cov, model_type)
    if reason is None:
        return
    if not allow_unquantized:
        raise UserError(f"{reason} ({when})")
    logging.getLogger(__name__).warning(
        "quant.allow_unquantized=true: training on a base only %.0f%% in 4-bit (%s): this is not QLoRA",
        100 * cov.fraction,
        ", ".join(cov.left_out_classes()[:3]),
    )


def predict_for(model_cfg, quant, compute_dtype: torch.dtype) -> tuple[Coverage, str]:
    """(predicted coverage, model_type) of the checkpoint ``model_cfg`` names, from its config.json alone."""
    from ..model import meta_model

    meta = meta_model(model_cfg)
    return predict(meta, quant, compute_dtype), str(meta.config.model_type)
