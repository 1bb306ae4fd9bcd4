"""Mixture-of-experts in NF4: fused 3-D expert weights quantized per expert, and LoRA on every expert.

transformers 5 holds the experts of Mixtral, Qwen3-MoE and their kin as two fused parameters per layer
(``mlp.experts.gate_up_proj``: experts x 2*ffn x hidden, ``mlp.experts.down_proj``: experts x hidden x ffn),
not as ``nn.Linear`` layers, so bitsandbytes' 4-bit loading leaves them in the compute dtype: 95% of a
Mixtral's bytes. This module closes that gap at load time, the way a module swap can:

- :func:`quantize_experts` replaces every such experts module by an :class:`NF4Experts`. Each expert's
  matrix is quantized on its own with bitsandbytes' ``quantize_4bit`` (the run's quant type, double
  quantization and storage dtype, block size 64 like ``Params4bit``). The packed data of all experts is one
  frozen parameter per matrix (experts x packed elements: ZeRO-3 shards it like any other parameter) carrying
  an :class:`ExpertsQuantState` in ``quant_state``. The forward is the stock eager experts loop, but it
  multiplies with bitsandbytes' ``matmul_4bit`` and only for the experts the batch routes to: each weight is
  dequantized inside the matmul (and again in backward), never kept.
- :func:`attach_expert_lora` wraps them in :class:`LoraExperts`: per-expert LoRA factors (``A``: r x in,
  ``B``: out x r) on ``gate_up_proj`` and ``down_proj``, with dropout on the expert's input exactly as peft's
  ``lora.Linear`` applies it. peft's own ``target_parameters`` (``ParamWrapper``) cannot do that: it adds
  ``B @ A`` to the weight, so it refuses dropout, and it needs an unquantized weight to add to.
  ``LoraExperts`` is a peft tuner layer, so peft marks its weights trainable and saves and loads them with
  the rest of the adapter (``...experts.lora_experts.gate_up_proj_A``); ZeRO-3 treats it as a leaf module
  and gathers the packed experts and their LoRA together. The router (``mlp.gate``) is never adapted.
- :func:`merge_expert_lora` folds those factors into the fused expert tensors of a merged model; saving it with
  ``save_pretrained`` writes the checkpoint's own layout (transformers reverses its conversion mapping).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import sys
from pathlib import Path

import torch
from torch import nn

EXPERT_MATRICES = ("gate_up_proj", "down_proj")
"""The fused expert parameters this module quantizes and adapts (transformers' names)."""
TARGET_NAMES = ("experts", *EXPERT_MATRICES)
"""Names ``lora.target_modules`` may use for the experts: ``experts`` means both matrices."""
BLOCKSIZE = 64
"""bitsandbytes' ``Params4bit`` default block size, which the dense 4-bit layers of a run use too."""
LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+\.experts)\.lora_experts\.(gate_up_proj|down_proj)_([AB])")
"""A saved adapter's key for an expert LoRA factor (peft drops the adapter name when it saves)."""


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers experts module holding its experts as fused 3-D ``gate_up_proj``/``down_proj``."""
    if isinstance(module, NF4Experts):
        return False
    for name in EXPERT_MATRICES:
        p = module._parameters.get(name) if hasattr(module, "_parameters") else None
        if p is None or len(getattr(p, "ds_shape", p.shape)) != 3:
            return False
    return True


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused experts module of ``model`` (a meta model works too)."""
    return [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]


def meta_quantized_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of a (meta) model that a qlora_dist load holds in NF4 besides bitsandbytes'
    ``Linear4bit`` weights: every fused expert matrix (for ``check``/``plan`` predictions of the 4-bit share)."""
    return [f"{name}.{m}" for name, _ in fused_experts(model) for m in EXPERT_MATRICES]


def has_nf4_experts(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Experts) for m in model.modules())


def check_supported(name: str, module: nn.Module) -> None:
    """Refuse expert layouts the NF4 forward does not implement (it would compute something else silently)."""
    from ..errors import ConfigError

    unsupported = {
        "biases": getattr(module, "has_bias", False),
        "transposed weights": getattr(module, "is_transposed", False),
        "no gate": not getattr(module, "has_gate", True),
        "interleaved gate/up": not getattr(module, "is_concatenated", True),
        "a post-expert norm": getattr(module, "has_post_expert_norm", False),
        "no act_fn": not hasattr(module, "act_fn"),
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise ConfigError(
            f"{name} ({type(module).__name__}): experts with {', '.join(found)} cannot be held in NF4 by qlora_dist "
            "yet; its NF4 experts support Mixtral/Qwen3-MoE-style experts (fused [gate; up], no bias)"
        )


# -- the quantized experts ----------------------------------------------------------------------------------


def _quant_state_class():
    import bitsandbytes.functional as F

    return F.QuantState


class ExpertsQuantState(_quant_state_class()):
    """The bitsandbytes quantization states of every expert of one fused matrix, one ``QuantState`` each.

    A ``QuantState`` (so code that asks "is this parameter 4-bit?" by its ``quant_state`` says yes), whose
    ``shape`` is the fused matrix's (experts x out x in) and whose ``as_dict`` holds every expert's state under
    ``<expert>.<key>`` (what the frozen-base checksum hashes). ``experts[e]`` is expert ``e``'s own state, the
    one its packed row is dequantized with.
    """

    def __init__(self, experts: list) -> None:
        first = experts[0]
        super().__init__(
            # No stacked copy of the statistics (it would cost memory): code reading ``absmax`` as if this were
            # one expert's state finds nothing, rather than expert 0's numbers.
            absmax=torch.empty(0, device=first.absmax.device),
            shape=torch.Size((len(experts), *first.shape)),
            code=first.code,
            blocksize=first.blocksize,
            quant_type=first.quant_type,
            dtype=first.dtype,
        )
        self.experts = experts

    def as_dict(self, packed: bool = False) -> dict:
        return {f"{e}.{k}": v for e, s in enumerate(self.experts) for k, v in s.as_dict(packed=packed).items()}

    def to(self, device) -> None:
        for s in self.experts:
            s.to(device)
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)


def quantize_stack(
    weight: torch.Tensor, quant_type: str, double_quant: bool, storage: torch.dtype, compute: torch.dtype
) -> tuple[torch.Tensor, ExpertsQuantState]:
    """``weight`` (experts x out x in) quantized one expert at a time: (packed, experts x elements; its state).

    Each expert goes through ``quantize_4bit`` exactly as a ``Linear4bit`` weight of that shape would (cast to
    the compute dtype first, as transformers loads it), so its blocks and double-quantization statistics are
    its own: an expert's dequantized weight does not depend on the other experts.
    """
    import bitsandbytes.functional as F

    packs, states = [], []
    for e in range(weight.shape[0]):
        w = weight[e].to(dtype=compute).contiguous()
        packed, state = F.quantize_4bit(
            w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage
        )
        packs.append(packed.reshape(-1))
        states.append(state)
        del w
    return torch.stack(packs), ExpertsQuantState(states)


class NF4Experts(nn.Module):
    """A layer's experts held in 4 bits: the drop-in for transformers' ``MixtralExperts`` & co.

    ``forward(hidden_states, top_k_index, top_k_weights)`` as theirs. ``lora`` (given by :class:`LoraExperts`)
    is called as ``lora(matrix, expert, x)`` and returns the low-rank update added to that matrix's output.
    """

    def __init__(
        self,
        source_class: type,
        act_fn: nn.Module,
        weights: dict[str, tuple[torch.Tensor, ExpertsQuantState]],
        compute: torch.dtype,
    ):
        """Already packed ``weights`` (``{matrix: (packed, state)}``); :meth:`quantize` makes them."""
        super().__init__()
        self.num_experts = int(weights[EXPERT_MATRICES[0]][0].shape[0])
        self.source_class = source_class  # the transformers class it replaced (tests rebuild it to compare)
        self.act_fn = act_fn
        self.compute_dtype = compute
        # The states live on the module too (as bitsandbytes' Linear4bit keeps one): FSDP2 replaces the
        # parameter objects, and the forward must not depend on an attribute of the parameter.
        self.quant_states: dict[str, ExpertsQuantState] = {}
        for name in EXPERT_MATRICES:
            packed, state = weights[name]
            param = nn.Parameter(packed, requires_grad=False)
            param.quant_state = state
            setattr(self, name, param)
            self.quant_states[name] = state

    @classmethod
    def quantize(cls, source: nn.Module, quant_type: str, double_quant: bool, storage: torch.dtype, compute):
        """transformers' fused experts ``source`` quantized per expert (:func:`quantize_stack`)."""
        weights = {
            name: quantize_stack(getattr(source, name).data, quant_type, double_quant, storage, compute)
            for name in EXPERT_MATRICES
        }
        return cls(type(source), source.act_fn, weights, compute)

    def restore_quant_states(self) -> None:
        """Put each state back on its parameter (after FSDP2 made new parameter objects)."""
        for name, state in self.quant_states.items():
            getattr(self, name).quant_state = state

    def shape(self, name: str) -> tuple[int, int, int]:
        """(experts, out, in) of matrix ``name``."""
        return tuple(self.quant_states[name].shape)

    def dequantized(self, name: str) -> torch.Tensor:
        """Matrix ``name`` of every expert, dequantized (experts x out x in, the compute dtype)."""
        import bitsandbytes.functional as F

        param = getattr(self, name)
        return torch.stack(
            [F.dequantize_4bit(param[e].view(-1, 1), s) for e, s in enumerate(self.quant_states[name].experts)]
        )

    def _matmul(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        import bitsandbytes as bnb

        param = getattr(self, name)
        # As Linear4bit: the input in the compute dtype, dequantized inside bitsandbytes' matmul (forward and
        # backward), the frozen weight never receiving a gradient.
        return bnb.matmul_4bit(
            x.to(self.compute_dtype), param[e].view(-1, 1).t(), quant_state=self.quant_states[name].experts[e]
        )

    def forward(self, hidden_states, top_k_index, top_k_weights, lora=None):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:  # only the experts some token is routed to are dequantized
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            h = self._matmul(x, "gate_up_proj", e)
            if lora is not None:
                h = h + lora("gate_up_proj", e, x)
            gate, up = h.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            out = self._matmul(h, "down_proj", e)
            if lora is not None:
                out = out + lora("down_proj", e, h)
            out = out.to(hidden_states.dtype) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def quantize_experts(model: nn.Module, quant, compute_dtype: torch.dtype) -> list[str]:
    """Swap every fused experts module of the loaded ``model`` for an :class:`NF4Experts`; return their names.

    ``quant`` is the run's ``QuantConfig`` with its storage dtype resolved. Should the weights be partitioned
    already (``zero.Init``; transformers 5.24 does not use it for a quantized model) each module's two parameters
    are gathered while it is quantized; every rank swaps the same modules in the same order.
    """
    from ..model import _DTYPES

    storage = _DTYPES[quant.storage_dtype]
    names = []
    for name, module in fused_experts(model):
        check_supported(name, module)
        params = [getattr(module, n) for n in EXPERT_MATRICES]
        with _gathered(params):
            new = NF4Experts.quantize(module, quant.quant_type, quant.double_quant, storage, compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        names.append(name)
    return names


def _gathered(params):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


# -- the quantized-base cache (base_cache.py) ---------------------------------------------------------------
#
# A pre-quantized transformers load restores bitsandbytes' Linear4bit layers, not these experts: the cache
# keeps them in files of their own, one per experts module, written from the packed parameters and their
# states (bitsandbytes' own serialisation, ``QuantState.as_dict(packed=True)``), and puts them back without
# quantizing. While the cached folder loads, the experts class of its modeling module is an ExpertsSlot: no
# weights, so transformers neither expects them in the checkpoint nor allocates and initialises the 16-bit
# experts it would then throw away.

EXPERTS_FILE_PREFIX = "nf4_experts."
"""Cache files ``nf4_experts.<module name>.safetensors``: that experts module's packed matrices and states."""


def cache_refusal(model: nn.Module) -> str | None:
    """Why the NF4 experts of ``model`` cannot be cached (None: they can, or there are none): the slot swap
    needs the experts class to be a global of a transformers modeling module, as the model builds it."""
    for name, module in model.named_modules():
        if isinstance(module, NF4Experts):
            cls = module.source_class
            owner = sys.modules.get(cls.__module__)
            if not cls.__module__.startswith("transformers.models.") or getattr(owner, cls.__name__, None) is not cls:
                return f"{name}: its experts class {cls.__module__}.{cls.__qualname__} is not one transformers builds"
    return None


@contextlib.contextmanager
def set_aside(model: nn.Module):
    """Take every :class:`NF4Experts` out of ``model`` for the block (so ``save_pretrained`` writes only the
    rest) and yield them, ``{module name: NF4Experts}``; they are put back afterwards, also on error."""
    experts = {n: m for n, m in model.named_modules() if isinstance(m, NF4Experts)}
    for name in experts:
        _replace(model, name, nn.Module())
    try:
        yield experts
    finally:
        for name, module in experts.items():
            _replace(model, name, module)


def save_cached(experts: dict[str, NF4Experts], folder: Path) -> None:
    """Write each experts module's packed matrices and quantization states into ``folder``."""
    from safetensors.torch import save_file

    for name, module in experts.items():
        tensors = {}
        for matrix in EXPERT_MATRICES:
            key = f"{name}.{matrix}"
            tensors[key] = getattr(module, matrix).data.contiguous()
            for k, v in module.quant_states[matrix].as_dict(packed=True).items():
                tensors[f"{key}.{k}"] = v.detach().clone()  # experts may share a quant map: no shared storage
        cls = module.source_class
        meta = {"source_class": f"{cls.__module__}:{cls.__name__}"}
        save_file(tensors, Path(folder) / f"{EXPERTS_FILE_PREFIX}{name}.safetensors", metadata=meta)


def _cached_files(folder: Path) -> dict[str, Path]:
    return {
        f.name[len(EXPERTS_FILE_PREFIX) : -len(".safetensors")]: f
        for f in sorted(Path(folder).glob(f"{EXPERTS_FILE_PREFIX}*.safetensors"))
    }


class ExpertsSlot(nn.Module):
    """Where a cached :class:`NF4Experts` goes: built as its transformers class would be, minus the weights."""

    source_class: type

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        with torch.device("meta"):
            template = self.source_class(*args, **kwargs)
        self.act_fn = template.act_fn
        # No weights to initialise (transformers' _init_weights would look for the fused matrices).
        self._is_hf_initialized = True


@contextlib.contextmanager
def slots_for_cached(folder: Path):
    """While the block loads the cached base in ``folder``, the experts classes its files name are built as
    :class:`ExpertsSlot` (the modeling module's global swapped, as ``plain_linear_layers`` does); a no-op for a
    folder without expert files."""
    from safetensors import safe_open

    specs = set()
    for path in _cached_files(folder).values():
        with safe_open(str(path), "pt") as f:
            specs.add((f.metadata() or {}).get("source_class", ""))
    swapped = []
    try:
        for spec in sorted(specs):
            module_name, _, cls_name = spec.partition(":")
            if not module_name.startswith("transformers.models.") or not cls_name:
                raise RuntimeError(f"{folder}: cached experts of an unknown class {spec!r}")
            owner = importlib.import_module(module_name)
            original = getattr(owner, cls_name)
            setattr(owner, cls_name, type(f"{cls_name}Slot", (ExpertsSlot,), {"source_class": original}))
            swapped.append((owner, cls_name, original))
        yield
    finally:
        for owner, cls_name, original in swapped:
            setattr(owner, cls_name, original)


def restore_cached(model: nn.Module, folder: Path, device: torch.device, compute: torch.dtype) -> list[str]:
    """Fill every :class:`ExpertsSlot` of ``model`` with the :class:`NF4Experts` cached in ``folder``, without
    quantizing; returns their names. Raises when the slots and the cached files do not pair up one to one."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    files = _cached_files(folder)
    slots = {n: m for n, m in model.named_modules() if isinstance(m, ExpertsSlot)}
    if set(files) != set(slots):
        raise RuntimeError(
            f"{folder}: cached NF4 experts for {sorted(set(files) - set(slots))[:3]} but experts modules to fill at "
            f"{sorted(set(slots) - set(files))[:3]}: delete the folder to rebuild it"
        )
    for name, slot in slots.items():
        # safetensors names a CPU device "cpu" only (a CPU rank's device is cpu:0 under accelerate).
        tensors = load_file(files[name], device="cpu" if device.type == "cpu" else str(device))
        weights = {}
        for matrix in EXPERT_MATRICES:
            key = f"{name}.{matrix}"
            packed = tensors.pop(key)
            per_expert: list[dict] = [{} for _ in range(packed.shape[0])]
            for k in [k for k in tensors if k.startswith(f"{key}.")]:
                e, _, field = k[len(key) + 1 :].partition(".")
                per_expert[int(e)][field] = tensors.pop(k)
            states = [F.QuantState.from_dict(qs, device) for qs in per_expert]
            weights[matrix] = (packed, ExpertsQuantState(states))
        _replace(model, name, NF4Experts(slot.source_class, slot.act_fn, weights, compute))
    return list(slots)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# -- LoRA on the experts ------------------------------------------------------------------------------------


def expert_targets(target_modules) -> tuple[str, ...]:
    """Which expert matrices ``lora.target_modules`` adapts: both for ``all-linear`` or ``experts``, else the
    fused matrix names it lists (``gate_up_proj``, ``down_proj``)."""
    if target_modules == "all-linear":
        return EXPERT_MATRICES
    names = set(target_modules)
    return EXPERT_MATRICES if "experts" in names else tuple(m for m in EXPERT_MATRICES if m in names)


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
"""Linear routers some MoE models have: ``all-linear`` leaves them alone (a list may still name them)."""


def peft_targets(target_modules, linear_names: list[str]):
    """``lora.target_modules`` as peft should see it on a model with NF4 experts: the experts' names removed
    (they are adapted here), a fused name kept where it also names linear layers (``down_proj`` of a dense
    MLP or a shared expert), and ``all-linear`` spelled out as those layers without routers."""
    from ..errors import ConfigError

    if target_modules == "all-linear":
        return [n for n in linear_names if n not in ROUTER_NAMES]
    kept = [m for m in target_modules if m not in TARGET_NAMES or m in linear_names]
    if not kept:
        raise ConfigError(
            f"lora.target_modules={list(target_modules)} names only the experts: qlora_dist needs at least one "
            "linear layer as well (add e.g. q_proj and v_proj)"
        )
    return kept


@contextlib.contextmanager
def without_peft_moe_remap():
    """Stop peft from re-targeting a fresh adapter at transformers' fused experts.

    peft 0.21 rewrites ``target_modules`` for MoE models so that adapters trained on transformers 4 still load:
    ``down_proj``, ``gate_proj``, ``w1``, ... and the router ``gate`` become ``target_parameters`` on the fused
    experts (its ``ParamWrapper``, which refuses dropout and needs an unquantized weight), and ``all-linear``
    names them all. Here the experts are NF4 and get their own LoRA, and the targets are already resolved, so
    that rewrite is turned off while the adapter is created.
    """
    import peft.utils.transformers_weight_conversion as conversion

    saved = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = saved


class ExpertLoraWeights(nn.Module):
    """One adapter's LoRA factors for every expert of one layer: ``<matrix>_A`` (experts x r x in) and
    ``<matrix>_B`` (experts x out x r), float32 like peft's adapters."""

    def __init__(self, experts: NF4Experts, matrices: tuple[str, ...], r: int, device) -> None:
        super().__init__()
        for name in matrices:
            n, out_features, in_features = experts.shape(name)
            a = torch.empty(n, r, in_features, dtype=torch.float32, device=device)
            for e in range(n):  # peft's lora_A init, one expert at a time (fan_in = in_features)
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.register_parameter(f"{name}_A", nn.Parameter(a))
            b = torch.zeros(n, out_features, r, dtype=torch.float32, device=device)
            self.register_parameter(f"{name}_B", nn.Parameter(b))


def _tuner_layer_class():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


class LoraExperts(nn.Module, _tuner_layer_class()):
    """:class:`NF4Experts` (``base_layer``) with per-expert LoRA: ``y_e = W_e x + B_e A_e dropout(x) * alpha/r``."""

    adapter_layer_names = ("lora_experts",)

    def __init__(self, base_layer: NF4Experts, adapter_name: str, matrices, r: int, alpha: float, dropout: float):
        super().__init__()
        device = base_layer.gate_up_proj.device
        self.base_layer = base_layer
        self.lora_experts = nn.ModuleDict({adapter_name: ExpertLoraWeights(base_layer, matrices, r, device)})
        self.lora_dropout = nn.ModuleDict({adapter_name: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.matrices = tuple(matrices)
        self.scaling = {adapter_name: alpha / r}
        self._active_adapter = adapter_name
        self.merged_adapters = []
        # ZeRO-3: gather every parameter below this module (the packed experts and their LoRA) when it runs,
        # instead of hooking the children, whose forward is never called.
        self._z3_leaf = True

    def forward(self, hidden_states, top_k_index, top_k_weights):
        lora = None if self.disable_adapters else self._lora
        return self.base_layer(hidden_states, top_k_index, top_k_weights, lora=lora)

    def _lora(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        if name not in self.matrices:
            return total
        for adapter in self.active_adapters:
            if adapter not in self.lora_experts:
                continue
            weights = self.lora_experts[adapter]
            a, b = getattr(weights, f"{name}_A")[e], getattr(weights, f"{name}_B")[e]
            # peft's lora.Linear: dropout on the input, in the adapter's dtype, scaled, cast back.
            low = self.lora_dropout[adapter](x.to(a.dtype)) @ a.t()
            total = total + ((low @ b.t()) * self.scaling[adapter]).to(x.dtype)
        return total


def attach_expert_lora(model: nn.Module, cfg, adapter_name: str = "default") -> list[str]:
    """Wrap every :class:`NF4Experts` of the peft ``model`` in a :class:`LoraExperts` for ``cfg`` (the run's
    ``LoraConfig``); returns the wrapped module names (none when the targets leave the experts alone)."""
    matrices = expert_targets(cfg.target_modules)
    if not matrices:
        return []
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Experts) and not name.endswith(".base_layer"):
            parent, _, child = name.rpartition(".")
            layer = LoraExperts(module, adapter_name, matrices, cfg.r, cfg.alpha, cfg.dropout)
            setattr(model.get_submodule(parent), child, layer)
            wrapped.append(name)
    return wrapped


def expert_lora_names(model: nn.Module) -> list[str]:
    """Names of the trainable expert LoRA parameters (for tests and reports)."""
    return [n for n, p in model.named_parameters() if ".lora_experts." in n and p.requires_grad]


def load_adapter(model: nn.Module, adapter_dir: Path):
    """``PeftModel.from_pretrained(model, adapter_dir)`` with the saved expert LoRA too: the unmerged model a
    saved adapter describes (what a merge must reproduce).

    On NF4 experts the expert LoRA is attached (:class:`LoraExperts`, the saved rank and alpha) and loaded from
    the adapter file; on fused experts in full precision its delta is folded into them (the same function).
    peft's MoE re-targeting stays off for an adapter that has expert LoRA (its targets are already resolved)."""
    import json
    import types

    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    pairs = read_expert_lora(adapter_dir)
    if not pairs:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    if not has_nf4_experts(model):
        merge_expert_lora(model, adapter_dir)
    with without_peft_moe_remap():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    if has_nf4_experts(model):
        saved = json.loads((adapter_dir / "adapter_config.json").read_text())
        matrices = [m for m in EXPERT_MATRICES if any(name.endswith(f".{m}") for name in pairs)]
        r = int(saved["r"])
        # rsLoRA (an adapter trained elsewhere) scales by alpha / sqrt(r), as peft and the merge do: an alpha that
        # gives that scale under LoraExperts' alpha / r.
        alpha = saved["lora_alpha"] * (math.sqrt(r) if saved.get("use_rslora") else 1.0)
        cfg = types.SimpleNamespace(target_modules=matrices, r=r, alpha=alpha, dropout=0.0)
        attach_expert_lora(peft_model, cfg)
        result = set_peft_model_state_dict(peft_model, load_file(adapter_dir / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise RuntimeError(
                f"{adapter_dir}: adapter weights with no place in the model: {result.unexpected_keys[:3]}"
            )
    return peft_model


# -- merging ------------------------------------------------------------------------------------------------


def read_expert_lora(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{fused weight name: {"A": ..., "B": ...}}`` from a saved adapter (float32), e.g.
    ``model.layers.0.mlp.experts.gate_up_proj``; empty when the adapter has no expert LoRA."""
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return pairs
    for key, tensor in load_file(path).items():
        match = LORA_KEY.fullmatch(key)
        if match:
            pairs.setdefault(f"{match.group(1)}.{match.group(2)}", {})[match.group(3)] = tensor.to(torch.float32)
    return pairs


def expert_delta(pair: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """Every expert's ``(B_e @ A_e) * scaling`` (experts x out x in, float32), peft's delta arithmetic."""
    return torch.bmm(pair["B"], pair["A"]) * scaling


@torch.no_grad()
def merge_expert_lora(model: nn.Module, adapter_dir: Path) -> int:
    """Add the saved expert LoRA deltas to the fused expert tensors of the plain (merged) ``model``; returns how
    many fused tensors changed. Raises when a saved factor has no fused tensor of that name and shape."""
    import json

    pairs = read_expert_lora(adapter_dir)
    if not pairs:
        return 0
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    r, alpha = int(cfg["r"]), cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    params = dict(model.named_parameters())
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"} or name not in params:
            raise RuntimeError(f"expert LoRA {name}: no fused expert tensor of that name, or half a pair")
        delta = expert_delta(pair, scaling)
        if tuple(delta.shape) != tuple(params[name].shape):
            raise RuntimeError(f"{name}: expert LoRA delta {tuple(delta.shape)} for {tuple(params[name].shape)}")
        params[name].add_(delta.to(params[name].dtype))
    return len(pairs)


# -- the 4-bit share (quant/coverage.py) --------------------------------------------------------------------

# Loaded models need nothing here: the packed expert parameters carry an ExpertsQuantState, which
# coverage.measure counts as 4-bit. A meta model still has transformers' fused experts, which this load will
# hold in NF4: the prediction (check, plan, the refusal before loading) must count them too.
from .coverage import register_predictor  # noqa: E402  (after the definitions it registers)

register_predictor(meta_quantized_parameters)
