"""Memory planner: what a run needs per GPU (and per node while loading), before anything is launched.

``qlora-dist plan RUN.yaml [--launch-config FILE] [--gpus N] [--gpu-memory 80GiB]`` reads the run config and
the model's ``config.json`` only. The model is built on the meta device (``accelerate.init_empty_weights``),
so the real parameter shapes, the layers transformers turns into 4-bit ``Linear4bit`` and the layers LoRA
targets come from the same classes a run uses, in a second or two even for 70B, with no weights.

Exact and estimated parts
-------------------------
*Exact* (a test compares them with the tensors of a loaded model, byte for byte, on CPU):

- ``nf4_weights``: every quantized linear layer as bitsandbytes lays it out: the packed 4-bit data,
  ``(n + 1) // (2 * s) * s`` bytes for ``n`` weights and a storage dtype of ``s`` bytes; one absmax per
  64-weight block (fp32, or with double quantization uint8 plus one fp32 nested absmax per 256 blocks, a
  256-entry fp32 nested code and the fp32 offset); and the 16-entry fp32 NF4 code of each layer. The JSON
  metadata tensor that ``quant_state.as_dict(packed=True)`` adds for *saving* is not held during training and
  is not counted.
- ``unquantized``: embeddings, norms, the output head (transformers never quantizes it) and the biases of
  quantized layers, in the compute dtype (fp32 for modules a model keeps in fp32).
- ``lora``: ``r x (in + out)`` fp32 weights per targeted layer (peft keeps adapters in fp32).
- ``gradients``: the LoRA gradients, fp32.
- ``optimizer``: torch AdamW keeps two fp32 moments (plus a 4-byte ``step`` tensor per parameter, on the host
  unless the device is the CPU); bitsandbytes' 8-bit AdamW keeps two uint8 moments with one fp32 absmax per
  256 values for parameters of at least 4096 elements (``min_8bit_size``), two fp32 moments for smaller ones,
  and two shared 256-entry fp32 quantization maps; paged 32-bit AdamW two fp32 moments (paged ones live in
  CUDA unified memory, outside PyTorch's allocator: ``optimizer_paged`` says how much).

*Estimated* (documented assumptions, see the functions):

- ``activations``: :func:`activation_bytes`, a per-layer count of what autograd keeps for backward in a
  Llama-style decoder with peft LoRA, plus the loss: one chunk of logits at a time with the chunked loss
  (``train.chunked_loss``, the default), else the full logits; taking the largest of the moments (end of
  forward, start of backward over the logits, backward through one decoder layer).
- ``comm_buffers``: 0 under DDP (qlora_dist sets ``gradient_as_bucket_view``: the gradients are the buckets)
  or DeepSpeed's reduce bucket (``reduce_bucket_size`` elements, fp32; 5e8 by default: 1.86 GiB).
- ``zero3_gathered``: under ZeRO-3, the largest module's weights gathered whole plus a prefetch bucket.
- ``overhead``: the CUDA context, cuBLAS workspaces and allocator slack: 1 GiB on a GPU (not seen by
  ``torch.cuda.max_memory_allocated``; ``peak_allocated_bytes`` leaves it and paged memory out).
- ``host_ram_bytes``: see :func:`host_ram_bytes`.

Per-rank shares: under ZeRO-2 gradients and optimizer state are split over the ranks; under ZeRO-3 the
parameters too (packed NF4 data, unquantized weights and LoRA; tensors under DeepSpeed's persistence threshold
of 1e5 elements stay whole). bitsandbytes' quantization state is not a parameter, so DeepSpeed does not
partition it: it stays whole on every rank. Offloaded parts are counted as host memory.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import UserError

GIB = 1024**3
NF4_BLOCKSIZE = 64
"""bitsandbytes' default 4-bit block size (``Params4bit.blocksize``; 128 on ROCm builds, not planned here)."""
NESTED_BLOCKSIZE = 256
"""Double quantization quantizes the absmax values in blocks of 256 (``quantize_4bit(compress_statistics=True)``)."""
OPTIM_8BIT_MIN_SIZE = 4096
"""bitsandbytes keeps 32-bit state for parameters with fewer elements (``min_8bit_size``)."""
OPTIM_8BIT_BLOCKSIZE = 256
"""bitsandbytes' blockwise 8-bit optimizer state: one fp32 absmax per 256 values."""
CUDA_OVERHEAD = 1 * GIB
"""CUDA context, cuBLAS/NCCL workspaces and allocator slack on a GPU (an estimate)."""
PROCESS_HOST_BASELINE = {"cuda": 3 * GIB, "cpu": 1 * GIB}
"""Host memory of one training process before weights: Python, torch, transformers (and the CUDA libraries)."""
DEFAULT_SHARD_BYTES = 5 * 10**9
"""Checkpoint shard size assumed when the model folder has no weight files (the hub's usual 5 GB shards)."""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}
_DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


# ----------------------------------------------------------------------------------------------------------
# Inputs: memory sizes and the launch config


def parse_memory(text: str | int) -> int:
    """``80GiB``, ``80GB``, ``80G`` (read as GiB, as GPU specs mean it), ``81920MiB``, ``1.5TiB`` or plain bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(text), flags=re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2)):
        raise UserError(f"bad memory size {text!r}: write it like 80GiB, 80GB, 141G or 81920MiB")
    value, prefix, binary, unit = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4)
    power = "kmgt".find(prefix) + 1 if prefix else 0
    # A bare "G" is what people write for GPU memory ("80G" A100s): binary, like "GiB". "GB" is decimal.
    base = 1000 if (unit and not binary) else 1024
    size = int(value * base**power)
    if size <= 0:
        raise UserError(f"bad memory size {text!r}: must be more than 0")
    return size


@dataclass
class LaunchPlan:
    """The parts of an accelerate launch config that change memory."""

    strategy: str = "single"
    """``single``, ``ddp``, ``zero2``, ``zero3`` or ``fsdp2`` (as ``run_report.json`` names them)."""
    num_processes: int = 1
    num_machines: int = 1
    offload_optimizer: str = "none"
    offload_param: str = "none"
    zero3_init: bool = False
    deepspeed: dict[str, int] = field(default_factory=lambda: dict(_DEEPSPEED_DEFAULTS))
    """Bucket sizes and the persistence threshold (elements) DeepSpeed runs with."""
    fsdp: dict[str, str] = field(default_factory=dict)
    """``FSDP_*`` variables accelerate's launcher exports from ``fsdp_config`` (what the fsdp2 strategy reads)."""
    mixed_precision: str = "no"
    source: str = "default: DDP, one process per GPU"

    @property
    def zero_stage(self) -> int:
        return {"zero2": 2, "zero3": 3}.get(self.strategy, 0)

    @property
    def offloads_optimizer(self) -> bool:
        return self.offload_optimizer not in ("none", "")

    @property
    def offloads_params(self) -> bool:
        return self.offload_param not in ("none", "")

    def to_env(self, num_processes: int | None = None) -> dict[str, str]:
        """The variables ``accelerate launch`` would give each worker for this launch (what strategies read)."""
        env = {"WORLD_SIZE": str(num_processes or self.num_processes)}
        if self.zero_stage:
            env.update(
                ACCELERATE_USE_DEEPSPEED="true",
                ACCELERATE_DEEPSPEED_ZERO_STAGE=str(self.zero_stage),
                ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE=self.offload_optimizer,
                ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE=self.offload_param,
                ACCELERATE_DEEPSPEED_ZERO3_INIT=str(self.zero3_init).lower(),
            )
        if self.strategy == "fsdp2":
            env.update(ACCELERATE_USE_FSDP="true", ACCELERATE_MIXED_PRECISION=self.mixed_precision, **self.fsdp)
        return env


def read_launch_config(path: str | Path) -> LaunchPlan:
    """Parse an accelerate launch config (YAML): the strategy, process count and DeepSpeed settings.

    ``distributed_type: DEEPSPEED`` reads ``deepspeed_config`` (``zero_stage``, ``offload_*_device``, or a
    ``deepspeed_config_file`` JSON whose ``zero_optimization`` also gives bucket sizes); ``MULTI_GPU``/``NO``
    mean DDP or a single process. Anything else (FSDP, TPU, ...) is not a strategy qlora_dist runs.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"launch config not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{p}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: not an accelerate launch config (expected a mapping with distributed_type)")
    kind = str(raw.get("distributed_type", "NO")).upper()
    try:
        processes = int(raw.get("num_processes", 1) or 1)
        machines = int(raw.get("num_machines", 1) or 1)
    except (TypeError, ValueError):
        raise UserError(f"{p}: num_processes and num_machines must be integers") from None
    if kind in ("NO", "MULTI_GPU"):
        return LaunchPlan(
            strategy="ddp" if processes > 1 else "single",
            num_processes=processes,
            num_machines=machines,
            source=str(p),
        )
    if kind == "FSDP":
        return _read_fsdp(raw, processes, machines, p)
    if kind != "DEEPSPEED":
        raise UserError(f"{p}: distributed_type {kind} is not planned: use DDP (MULTI_GPU), DEEPSPEED or FSDP")
    ds = raw.get("deepspeed_config") or {}
    if not isinstance(ds, dict):
        raise UserError(f"{p}: deepspeed_config must be a mapping")
    zero = {}
    if ds.get("deepspeed_config_file"):
        zero = _read_deepspeed_json(p.parent, ds["deepspeed_config_file"])
    stage = zero.get("stage", ds.get("zero_stage", 2))
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        raise UserError(f"{p}: zero_stage must be 2 or 3, got {stage!r}") from None
    if stage not in (2, 3):
        raise UserError(f"{p}: DeepSpeed ZeRO stage {stage} is not supported with a 4-bit base: use stage 2 or 3")
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", ds.get("offload_optimizer_device", "none"))
    offload_par = (zero.get("offload_param") or {}).get("device", ds.get("offload_param_device", "none"))
    sizes = dict(_DEEPSPEED_DEFAULTS)
    for key in sizes:
        value = zero.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sizes[key] = int(value)
        elif value == "auto":
            sizes[key] = -1  # accelerate fills it from the model's hidden size (see _deepspeed_sizes)
    return LaunchPlan(
        strategy=f"zero{stage}",
        num_processes=processes,
        num_machines=machines,
        offload_optimizer=str(offload_opt or "none").lower(),
        offload_param=str(offload_par or "none").lower(),
        zero3_init=str(ds.get("zero3_init_flag", False)).lower() == "true",
        deepspeed=sizes,
        source=str(p),
    )


def _read_fsdp(raw: dict[str, Any], processes: int, machines: int, p: Path) -> LaunchPlan:
    """``distributed_type: FSDP``: ``fsdp_config`` as the ``FSDP_*`` variables accelerate's launcher exports
    (``fsdp_version`` becomes ``FSDP_VERSION``, booleans ``true``/``false``)."""
    fsdp = raw.get("fsdp_config") or {}
    if not isinstance(fsdp, dict):
        raise UserError(f"{p}: fsdp_config must be a mapping")
    env = {"FSDP_VERSION": "1"}  # accelerate's default when the file does not say
    for key, value in fsdp.items():
        name = "FSDP_" + str(key).removeprefix("fsdp_").upper()
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return LaunchPlan(
        strategy="fsdp2",
        num_processes=processes,
        num_machines=machines,
        fsdp=env,
        mixed_precision=str(raw.get("mixed_precision", "no") or "no").lower(),
        source=str(p),
    )


def _read_deepspeed_json(base: Path, name: str) -> dict[str, Any]:
    f = Path(name) if Path(name).is_absolute() else base / name
    if not f.is_file():
        f = Path(name)
    try:
        zero = json.loads(f.read_text()).get("zero_optimization") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"deepspeed_config_file {name}: cannot read it ({e})") from None
    if not isinstance(zero, dict):
        raise UserError(f"deepspeed_config_file {name}: zero_optimization must be a mapping")
    return zero


# ----------------------------------------------------------------------------------------------------------
# The model's layout, from config.json on the meta device


@dataclass
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ExpertShape:
    """One fused expert matrix of a MoE layer (``mlp.experts.gate_up_proj``): ``experts`` x out x in, held in
    NF4 one expert at a time (:mod:`qlora_dist.quant.moe`)."""

    name: str
    experts: int
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.experts * self.out_features * self.in_features


@dataclass
class ModelLayout:
    """Parameter shapes of a causal LM, split the way a 4-bit load splits them."""

    model_type: str
    quantized: list[LinearShape]
    """Linear layers transformers replaces by bitsandbytes ``Linear4bit`` (every ``nn.Linear`` but the head)."""
    unquantized: list[tuple[str, int, str]]
    """(name, elements, fp32 rule) of every other parameter: embeddings, norms, head, biases. The rule is
    ``always`` (``_keep_in_fp32_modules_strict``), ``float16`` (``_keep_in_fp32_modules``: fp32 in a float16
    load only) or empty (the compute dtype)."""
    lora_candidates: list[LinearShape]
    """Linear layers LoRA may target (every linear layer but the output head)."""
    module_params: dict[str, int]
    """Elements of the parameters each leaf module owns (ZeRO-3 gathers a module's parameters together)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    checkpoint_dtype: str
    experts: list[ExpertShape] = field(default_factory=list)
    """Fused MoE expert matrices, quantized per expert by qlora_dist (not by transformers)."""
    rows: dict[str, int] = field(default_factory=dict)
    """Dimension 0 of each unquantized parameter (FSDP2 shards every parameter along it)."""
    logit_softcap: bool = False
    """The head soft-caps its logits (Gemma 2/3): the chunked loss keeps the cap's slope per entry too."""

    @property
    def total_params(self) -> int:
        return (
            sum(q.numel + (q.out_features if q.bias else 0) for q in self.quantized)
            + sum(n for name, n, _ in self.unquantized if not _is_bias_of(name, self.quantized))
            + sum(x.numel for x in self.experts)
        )


def _is_bias_of(name: str, quantized: list[LinearShape]) -> bool:
    return name.endswith(".bias") and any(name == f"{q.name}.bias" for q in quantized)


def model_layout(name_or_path: str, trust_remote_code: bool = False) -> ModelLayout:
    """Build the model from ``config.json`` on the meta device and read its layout. No weights are read."""
    from torch import nn

    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        what = "folder has no config.json" if folder.is_dir() else "no such folder"
        from .model import local_copy_hint

        raise UserError(
            f"model.name_or_path={name_or_path}: {what} (the planner reads the model's config.json from a local "
            f"folder){local_copy_hint(name_or_path)}"
        )
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from .model import check_not_prequantized
    from .quant.layers import plain_linear_layers

    check_not_prequantized(folder / "config.json")  # the same refusal a run gives (GPTQ, AWQ, ...)
    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        # Built as a run loads it: Falcon's linear layers as nn.Linear (quant/layers.py).
        with init_empty_weights(include_buffers=True), plain_linear_layers(cfg.model_type):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot build the model from {folder / 'config.json'}: {first}") from None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    head = model.get_output_embeddings()
    skip = _modules_not_quantized(model)
    quantized, lora, module_params = [], [], {}
    quantized_names = set()
    for mname, module in model.named_modules():
        own = [p for _, p in module.named_parameters(recurse=False)]
        if own:
            module_params[mname] = sum(p.numel() for p in own)
        if isinstance(module, (nn.Linear, Conv1D)):
            if isinstance(module, Conv1D):  # GPT-2: weight (in, out); bitsandbytes quantizes it too
                shape = LinearShape(mname, *module.weight.shape, module.bias is not None)
            else:
                shape = LinearShape(mname, module.in_features, module.out_features, module.bias is not None)
            if module is not head:
                lora.append(shape)
            if (type(module) is nn.Linear or isinstance(module, Conv1D)) and _should_convert(mname, skip):
                quantized.append(shape)
                quantized_names.add(mname)
    from .quant import moe

    experts = [
        ExpertShape(f"{mname}.{m}", *getattr(module, m).shape)
        for mname, module in moe.fused_experts(model)
        for m in moe.EXPERT_MATRICES
    ]
    expert_names = {x.name for x in experts}
    strict = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    loose = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    unquantized, rows = [], {}
    for pname, p in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        if (owner in quantized_names and leaf == "weight") or pname in expert_names:
            continue
        rule = "always" if _matches_any(pname, strict) else "float16" if _matches_any(pname, loose) else ""
        unquantized.append((pname, p.numel(), rule))
        rows[pname] = int(p.shape[0]) if p.dim() else 1

    heads = int(getattr(text_cfg, "num_attention_heads", 1) or 1)
    hidden = int(getattr(text_cfg, "hidden_size", 0) or 0)
    ckpt_dtype = getattr(text_cfg, "dtype", None) or getattr(text_cfg, "torch_dtype", None) or "float32"
    layout = ModelLayout(
        model_type=str(getattr(text_cfg, "model_type", type(model).__name__)),
        quantized=quantized,
        unquantized=unquantized,
        lora_candidates=lora,
        module_params=module_params,
        hidden=hidden,
        intermediate=int(getattr(text_cfg, "intermediate_size", 4 * hidden) or 4 * hidden),
        layers=int(getattr(text_cfg, "num_hidden_layers", 0) or 0),
        heads=heads,
        kv_heads=int(getattr(text_cfg, "num_key_value_heads", heads) or heads),
        head_dim=int(getattr(text_cfg, "head_dim", None) or (hidden // heads if heads else 0)),
        vocab=int(getattr(text_cfg, "vocab_size", 0) or 0),
        checkpoint_dtype=str(ckpt_dtype).replace("torch.", ""),
        experts=experts,
        rows=rows,
        logit_softcap=bool(getattr(text_cfg, "final_logit_softcapping", None)),
    )
    return layout


def _modules_not_quantized(model) -> list[str]:
    """The module names transformers' bitsandbytes quantizer leaves unconverted (its own rule, where importable:
    the output head, tied weights, the last parameter's module, and ``_keep_in_fp32_modules``)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        keys = list(get_keys_to_not_convert(model))
    except ImportError:  # older transformers: the same rule, written out
        keys = [list(model.named_parameters())[-1][0].removesuffix(".weight")]
        head = model.get_output_embeddings()
        keys += [n for n, m in model.named_modules() if head is not None and m is head]
    keys += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(keys))


def _should_convert(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, skip)
    except ImportError:
        return not any(_matches(name, key) for key in skip)


def _matches(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".") or name.endswith("." + key) or f".{key}." in f".{name}."


def _matches_any(name: str, keys: list[str]) -> bool:
    return any(_matches(name, k) for k in keys)


# ----------------------------------------------------------------------------------------------------------
# Exact byte counts


def nf4_layer_bytes(numel: int, double_quant: bool, storage_bytes: int = 1) -> dict[str, int]:
    """Bytes of one 4-bit weight as bitsandbytes holds it: ``packed`` data and ``state`` (quantization state).

    Packed: two 4-bit codes per byte, stored in a tensor of the storage dtype, ``(n + 1) // (2 s)`` elements
    of ``s`` bytes (bitsandbytes' ``quantize_4bit``). State: the 16-entry fp32 code; one absmax per 64 values,
    fp32, or with double quantization uint8 plus an fp32 nested absmax per 256 absmax values, the 256-entry
    fp32 nested code and the fp32 scalar offset.
    """
    packed = (numel + 1) // (2 * storage_bytes) * storage_bytes
    blocks = -(-numel // NF4_BLOCKSIZE)
    state = 16 * 4  # quant_map: the NF4 code
    if double_quant:
        state += blocks + -(-blocks // NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4
    else:
        state += blocks * 4
    return {"packed": packed, "state": state}


def lora_shapes(layout: ModelLayout, target_modules: str | list[str], r: int) -> list[tuple[str, int]]:
    """(name, elements) of every LoRA tensor: ``lora_A`` is r x in, ``lora_B`` out x r, per targeted layer.

    The targets follow :func:`qlora_dist.model.attach_lora`: ``all-linear`` is every linear layer but the
    output head; a list names layers by their last name component, and a name no layer has is an error.
    """
    from .errors import ConfigError
    from .quant import moe

    if target_modules == "all-linear":
        targets = layout.lora_candidates
        if layout.experts:  # as attach_lora resolves it on a MoE model: no linear routers
            targets = [s for s in targets if s.name.rsplit(".", 1)[-1] not in moe.ROUTER_NAMES]
    else:
        available = sorted({s.name.rsplit(".", 1)[-1] for s in layout.lora_candidates})
        if layout.experts:
            available = sorted({*available, *moe.TARGET_NAMES})
        missing = [m for m in target_modules if m not in available]
        if missing:
            raise ConfigError(
                f"lora.target_modules: {', '.join(missing)} match no linear layer of this model; "
                f"its linear layers are {', '.join(available)} (or use all-linear)"
            )
        wanted = set(target_modules)
        targets = [s for s in layout.lora_candidates if s.name.rsplit(".", 1)[-1] in wanted]
    out = []
    for s in targets:
        out.append((f"{s.name}.lora_A", r * s.in_features))
        out.append((f"{s.name}.lora_B", s.out_features * r))
    matrices = moe.expert_targets(target_modules) if layout.experts else ()
    for x in layout.experts:  # per-expert factors, one experts x r x in and one experts x out x r tensor
        module, _, matrix = x.name.rpartition(".")
        if matrix in matrices:
            out.append((f"{module}.lora_experts.{matrix}_A", x.experts * r * x.in_features))
            out.append((f"{module}.lora_experts.{matrix}_B", x.experts * x.out_features * r))
    return out


def optimizer_bytes(name: str, numels: list[int], step_on_device: bool = False) -> dict[str, int]:
    """State bytes of ``name`` over parameters of ``numels`` elements (all fp32): ``device``, ``paged``, ``host``.

    ``paged`` is the part of ``device`` a paged bitsandbytes optimizer keeps in CUDA unified memory (its
    buffers of at least 1e5 elements). ``step_on_device``: torch AdamW's per-parameter ``step`` scalars (4 bytes
    each) live on the CPU unless the parameters do.
    """
    device = paged = host = 0
    if name == "adamw":
        device = sum(8 * n for n in numels)
        steps = 4 * len(numels)
        device, host = (device + steps, 0) if step_on_device else (device, steps)
    elif name in ("adamw_8bit", "paged_adamw_8bit"):
        eight_bit = False
        for n in numels:
            if n >= OPTIM_8BIT_MIN_SIZE:
                eight_bit = True
                state = 2 * n + 2 * 4 * -(-n // OPTIM_8BIT_BLOCKSIZE)
                buffers = 2 * n
            else:
                state = buffers = 8 * n
            device += state
            if name.startswith("paged") and n >= 100_000:
                paged += buffers
        if eight_bit:
            device += 2 * 256 * 4  # the signed and unsigned dynamic quantization maps, shared by all parameters
    elif name == "paged_adamw_32bit":
        for n in numels:
            device += 8 * n
            if n >= 100_000:
                paged += 8 * n
    elif name == "deepspeed_cpu_adam":
        host = sum(8 * n for n in numels)
    else:
        raise UserError(f"no memory model for optimizer {name}")
    return {"device": device, "paged": paged, "host": host}


# ----------------------------------------------------------------------------------------------------------
# Estimates


def activation_bytes(
    layout: ModelLayout,
    lora_targets: set[str],
    r: int,
    dropout: float,
    micro_batch: int,
    seq_len: int,
    dtype_bytes: int,
    checkpointing: bool,
    device: str = "cuda",
    loss_chunk: int | None = None,
) -> int:
    """Peak bytes of activations and their gradients in one forward + backward (an estimate).

    Counted per token of a Llama-style decoder layer (``h`` hidden, ``i`` intermediate, ``q`` = heads x head dim,
    ``e`` bytes of the compute dtype), as autograd saves it with peft LoRA and SDPA attention:

    - each RMSNorm keeps its input in fp32 (``4h``) and the fp32 reciprocal RMS;
    - each LoRA layer keeps its dropped-out input in fp32 (``4 x in``), the dropout mask (bool on CUDA, fp32 on a
      CPU: ``1`` or ``4 x in``; none without dropout) and its rank-``r`` hidden value (``4r``); the frozen 4-bit
      matmul keeps nothing but its weight;
    - attention keeps q, k and v after rotary embedding (k and v repeated to every head: a padding mask stops
      SDPA from using grouped-query kernels), its output (``4q e``) and the fp32 log-sum-exp per head;
    - the MLP keeps the gate output, its SiLU and the up projection (``3i e``).

    With gradient checkpointing each layer keeps only its input (``h e``) and one layer at a time is recomputed
    in backward. The loss over the logits (``V`` vocabulary) costs, at its peak, the logits, their fp32 copy and
    fp32 log-softmax at the end of forward, or the log-softmax with two fp32 gradients at the start of backward
    (``12 V`` per token). With the chunked loss (``loss_chunk`` tokens, :mod:`qlora_dist.loss`) no token holds
    logits: each labelled token keeps a copy of its final hidden row and that row's gradient (``2 h e``), and one
    chunk at a time holds its logits, their fp32 copy (in which the gradient is then made in place), a
    soft-cap's slope and the gradient cast back for the matmul (``e + 4`` per vocabulary entry and chunk
    token, 4 more with a soft-cap). The result is the largest of: end of forward, start of backward, and backward through
    a decoder layer (saved tensors plus transient gradients and one dequantized weight), plus the padding-aware
    attention mask every layer shares (``b x s x s``, bool and compute dtype). Not counted: the rotary tables
    (shared, small) and kernels' own workspaces. ``seq_len`` is ``data.max_length``, the longest a batch can be.
    """
    tokens = micro_batch * seq_len
    h, i, e, v = layout.hidden, layout.intermediate, dtype_bytes, layout.vocab
    q = layout.heads * layout.head_dim
    keep_lora = 4 + ((1 if device == "cuda" else 4) if dropout > 0 else 0)
    per_layer = 2 * (4 * h + 4)  # two RMSNorms
    per_layer += (4 * q) * e + 4 * layout.heads  # attention: q, k, v (repeated to every head), output; lse
    per_layer += 3 * i * e  # MLP
    layer0 = layout.lora_candidates[0].name.rsplit(".", 2)[0] if layout.lora_candidates else ""
    largest_weight = 0
    for s in layout.lora_candidates:
        if s.name.startswith(layer0 + ".") and s.name.rsplit(".", 1)[-1] in lora_targets:
            per_layer += keep_lora * s.in_features + 4 * r
        if s.name.startswith(layer0 + "."):
            largest_weight = max(largest_weight, s.numel)
    layer_backward = 2 * i * e + 2 * 4 * h  # gradients in flight inside a layer's backward
    inputs = 4 * 8  # input ids, attention mask, labels, position ids (int64)
    final_norm = 4 * h
    kept = layout.layers * (h * e if checkpointing else per_layer)
    through_layer = kept + (per_layer if checkpointing else 0) + layer_backward
    attention_mask = micro_batch * seq_len * seq_len * (e + 1)
    fixed = largest_weight * e + attention_mask
    if loss_chunk is not None:
        chunk = min(tokens, loss_chunk)
        loss_moment = tokens * (kept + final_norm + 2 * h * e + inputs) + chunk * v * (
            e + 4 + (4 if layout.logit_softcap else 0)
        )
        return max(loss_moment, tokens * (through_layer + inputs)) + fixed
    logits_forward = v * (e + (e if micro_batch > 1 else 0) + (4 if e != 4 else 0) + 4)
    logits_backward = v * max(12, 4 + 2 * e)
    end_of_forward = kept + final_norm + logits_forward
    start_of_backward = kept + final_norm + logits_backward
    peak = max(end_of_forward, start_of_backward, through_layer) + inputs
    return tokens * peak + fixed


def host_ram_bytes(
    layout: ModelLayout, model_dir: Path, processes_per_node: int, device: str, offloaded_per_rank: int
) -> dict[str, int]:
    """Host memory each node needs while loading (an estimate).

    Assumes transformers loads the checkpoint shard by shard from memory-mapped safetensors files, each
    process materialising at most one shard's tensors at a time before quantizing them on its GPU; so one
    process needs its baseline (Python, torch, CUDA libraries: 3 GiB on a GPU machine) plus the largest shard
    (the largest ``*.safetensors`` file in the model folder, or 5 GB when the folder has none). Every process
    on a node does this at once. The checkpoint's pages in the page cache are shared and reclaimable, so they
    are reported (``checkpoint_bytes``) but not required. Parts offloaded by DeepSpeed (pinned host memory)
    are added per process.
    """
    checkpoint = _checkpoint_bytes(layout)
    shards = [f.stat().st_size for f in model_dir.glob("*.safetensors")] + [
        f.stat().st_size for f in model_dir.glob("*.bin")
    ]
    largest_shard = max(shards) if shards else min(DEFAULT_SHARD_BYTES, checkpoint)
    per_process = PROCESS_HOST_BASELINE[device] + largest_shard + offloaded_per_rank
    return {
        "host_ram_bytes": processes_per_node * per_process,
        "per_process": per_process,
        "largest_shard": largest_shard,
        "checkpoint_bytes": checkpoint,
        "offloaded_per_process": offloaded_per_rank,
    }


def _checkpoint_bytes(layout: ModelLayout) -> int:
    per = _DTYPE_BYTES.get(layout.checkpoint_dtype, 4)
    return layout.total_params * per


# ----------------------------------------------------------------------------------------------------------
# The plan


ITEMS = (
    ("nf4_weights", "NF4 weights + quant state"),
    ("unquantized", "unquantized (embeddings, norms, head, biases)"),
    ("lora", "LoRA weights (fp32)"),
    ("gradients", "gradients (LoRA, fp32)"),
    ("optimizer", "optimizer state"),
    ("master_weights", "DeepSpeed fp32 master partition"),
    ("comm_buffers", "gradient communication buckets"),
    ("zero3_gathered", "ZeRO-3 gathered weights (largest module + prefetch)"),
    ("fsdp2_gathered", "FSDP2 gathered weights (root unit + 2 decoder layers)"),
    ("activations", "activations"),
    ("overhead", "CUDA context + workspaces"),
)


@dataclass
class MemoryPlan:
    """What one GPU (and one node while loading) needs; ``to_dict`` is ``--json``'s object."""

    model: dict[str, Any]
    strategy: str
    gpus: int
    device: str
    compute_dtype: str
    optimizer: str
    micro_batch_size: int
    max_length: int
    gradient_checkpointing: bool
    per_gpu_bytes: dict[str, int]
    gpu_memory_bytes: int
    fits: bool
    max_micro_batch: int
    peak_allocated_bytes: int
    host: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["host_ram_bytes"] = self.host["host_ram_bytes"]
        return d


def plan_memory(
    config: RunConfig,
    launch: LaunchPlan | None = None,
    gpus: int | None = None,
    gpu_memory: int = 80 * GIB,
    device: str = "cuda",
    layout: ModelLayout | None = None,
) -> MemoryPlan:
    """Plan the memory of ``config`` under ``launch`` (default: DDP) on ``gpus`` devices of ``gpu_memory`` bytes.

    ``device`` decides what ``auto`` dtypes mean: ``cuda`` plans bfloat16 compute, ``cpu`` float32 (as a run on
    that device resolves them, see :func:`qlora_dist.model.resolve_dtype`).
    """
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device {device}: choose cuda or cpu")
    launch = launch or LaunchPlan()
    world = gpus if gpus is not None else launch.num_processes
    if world < 1:
        raise UserError(f"--gpus {world}: must be at least 1")
    if launch.strategy in ("single", "ddp"):
        launch = dataclasses.replace(launch, strategy="ddp" if world > 1 else "single")
    _check_strategy(config, launch)
    layout = layout or model_layout(config.model.name_or_path, config.model.trust_remote_code)
    compute = config.quant.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if device == "cuda" else "float32"
    ds = _deepspeed_sizes(launch, layout)
    place = _Placement(
        world,
        launch.strategy == "zero3",
        launch.offloads_params,
        ds["stage3_param_persistence_threshold"],
        fsdp2=launch.strategy == "fsdp2",
    )
    lora = lora_shapes(layout, config.lora.target_modules, config.lora.r)
    weights = _weight_bytes(config, layout, place, compute, lora)
    state = _training_state_bytes(config, launch, layout, place, compute, lora, device, ds)
    targets = {name.rsplit(".", 2)[-2] for name, _ in lora}

    def activations(micro_batch: int, checkpointing: bool) -> int:
        return activation_bytes(
            layout,
            targets,
            config.lora.r,
            config.lora.dropout,
            micro_batch,
            config.data.max_length,
            _DTYPE_BYTES[compute],
            checkpointing,
            device,
            loss_chunk,
        )

    loss_chunk = None
    if config.train.chunked_loss:
        from .loss import auto_chunk_tokens

        loss_chunk = config.train.loss_chunk_tokens or auto_chunk_tokens(layout.vocab)
    ckpt = config.train.gradient_checkpointing
    overhead = CUDA_OVERHEAD if device == "cuda" else 0
    per_gpu = {
        **{k: weights[k] for k in ("nf4_weights", "unquantized", "lora")},
        **{k: state[k] for k in ("gradients", "optimizer", "master_weights", "comm_buffers", "zero3_gathered")},
        "fsdp2_gathered": fsdp2_gathered_bytes(config, layout, compute) if place.fsdp2 else 0,
        "activations": activations(config.train.micro_batch_size, ckpt),
        "overhead": overhead,
    }
    static = sum(v for k, v in per_gpu.items() if k != "activations")
    per_gpu["total"] = static + per_gpu["activations"]
    per_gpu["activations_with_checkpointing"] = activations(config.train.micro_batch_size, True)
    per_gpu["activations_without_checkpointing"] = activations(config.train.micro_batch_size, False)
    per_gpu["optimizer_paged"] = state["paged"]
    # FSDP2 here, and ZeRO-3 too (transformers 5.x builds a quantized model on the meta device, never under
    # deepspeed.zero.Init, and bitsandbytes places it on this rank's device; DeepSpeed partitions it only in
    # deepspeed.initialize), load and quantize the whole base on every device before sharding it: that moment
    # can be the peak (DDP's weights, no training state yet).
    replica = _weight_bytes(config, layout, dataclasses.replace(place, fsdp2=False, zero3=False), compute, lora)
    whole_first = place.fsdp2 or place.zero3
    per_gpu["load_peak"] = replica["nf4_weights"] + replica["unquantized"] + overhead if whole_first else 0

    per_node = -(-world // max(1, launch.num_machines))
    offloaded = weights["host"] + state["host"]
    host = host_ram_bytes(layout, Path(config.model.name_or_path).expanduser(), per_node, device, offloaded)
    return MemoryPlan(
        model={
            "name_or_path": config.model.name_or_path,
            "model_type": layout.model_type,
            "params": layout.total_params,
            "quantized_params": sum(q.numel for q in layout.quantized) + sum(x.numel for x in layout.experts),
            "quantized_layers": len(layout.quantized),
            "nf4_expert_matrices": len(layout.experts),
            "lora_params": sum(n for _, n in lora),
            "layers": layout.layers,
            "hidden_size": layout.hidden,
            "vocab_size": layout.vocab,
        },
        strategy=launch.strategy + ("_offload" if launch.offloads_optimizer or launch.offloads_params else ""),
        gpus=world,
        device=device,
        compute_dtype=compute,
        optimizer=state["name"],
        micro_batch_size=config.train.micro_batch_size,
        max_length=config.data.max_length,
        gradient_checkpointing=ckpt,
        per_gpu_bytes=per_gpu,
        gpu_memory_bytes=gpu_memory,
        fits=max(per_gpu["total"], per_gpu["load_peak"]) <= gpu_memory,
        max_micro_batch=0
        if per_gpu["load_peak"] > gpu_memory
        else _largest_batch(lambda b: static + activations(b, ckpt), gpu_memory),
        peak_allocated_bytes=per_gpu["total"] - overhead - state["paged"],
        host=host,
        notes=_notes(config, launch, state, ds)
        + (
            [
                f"{launch.strategy} loads the whole 4-bit base on each GPU before sharding it: "
                f"{per_gpu['load_peak'] / GIB:.2f} GiB"
            ]
            if whole_first
            else []
        ),
    )


@dataclass
class _Placement:
    """Where a parameter's elements live: on this GPU, or in host memory (ZeRO-3 parameter offload)."""

    world: int
    zero3: bool
    offload_params: bool
    persistence_threshold: int
    fsdp2: bool = False
    """FSDP2 as qlora_dist runs it: the frozen base sharded along dimension 0, LoRA whole (see ``_weight_bytes``)."""

    def gpu(self, elements: int) -> int:
        """Elements this rank holds on its GPU: everything, or under ZeRO-3 its partition ``ceil(n / N)``
        (none when offloaded); parameters of at most the persistence threshold also stay whole (``ds_persist``)."""
        if not self.zero3:
            return elements
        partition = -(-elements // self.world)
        if elements <= self.persistence_threshold:
            return elements + partition
        return 0 if self.offload_params else partition

    def host(self, elements: int) -> int:
        """Elements of the partition held in host memory under ``offload_param``."""
        if not (self.zero3 and self.offload_params) or elements <= self.persistence_threshold:
            return 0
        return -(-elements // self.world)


def _weight_bytes(
    config: RunConfig, layout: ModelLayout, place: _Placement, compute: str, lora: list[tuple[str, int]]
) -> dict[str, int]:
    """Per-GPU bytes of the frozen base (``nf4_weights``, ``unquantized``), of the adapters (``lora``), and the
    ``host`` bytes offloaded. The packed NF4 data is a parameter (partitioned under ZeRO-3); its quantization
    state is not, so it stays whole on every rank."""
    storage = config.quant.storage_dtype
    if place.zero3:
        storage = compute  # ZeRO-3 partitions the packed weights only in the compute dtype
    elif storage == "auto":
        storage = "uint8"
    s = _DTYPE_BYTES[storage]
    out = {"nf4_weights": 0, "unquantized": 0, "lora": 0, "host": 0}
    if place.fsdp2:
        # fully_shard splits dimension 0 in world chunks; rank 0 holds the largest, ceil(rows / world) rows. The
        # packed data is one column; the quantization state is not a parameter and stays whole; LoRA stays whole.
        w = place.world
        for q in layout.quantized:
            b = nf4_layer_bytes(q.numel, config.quant.double_quant, s)
            out["nf4_weights"] += -(-(b["packed"] // s) // w) * s + b["state"]
        for x in layout.experts:  # the packed experts are experts x packed: dimension 0 is the experts
            b = nf4_layer_bytes(x.out_features * x.in_features, config.quant.double_quant, s)
            out["nf4_weights"] += -(-x.experts // w) * b["packed"] + x.experts * b["state"]
        for name, n, rule in layout.unquantized:
            size = 4 if rule == "always" or (rule == "float16" and compute == "float16") else _DTYPE_BYTES[compute]
            rows = layout.rows.get(name, 1) or 1
            out["unquantized"] += -(-rows // w) * (n // rows) * size
        out["lora"] = 4 * sum(n for _, n in lora)
        return out
    for q in layout.quantized:
        b = nf4_layer_bytes(q.numel, config.quant.double_quant, s)
        out["nf4_weights"] += place.gpu(b["packed"] // s) * s + b["state"]
        out["host"] += place.host(b["packed"] // s) * s
    for x in layout.experts:  # one packed parameter per matrix (all experts), one quantization state per expert
        b = nf4_layer_bytes(x.out_features * x.in_features, config.quant.double_quant, s)
        elements = x.experts * (b["packed"] // s)
        out["nf4_weights"] += place.gpu(elements) * s + x.experts * b["state"]
        out["host"] += place.host(elements) * s
    for _, n, rule in layout.unquantized:
        size = 4 if rule == "always" or (rule == "float16" and compute == "float16") else _DTYPE_BYTES[compute]
        out["unquantized"] += place.gpu(n) * size
        out["host"] += place.host(n) * size
    for _, n in lora:
        out["lora"] += place.gpu(n) * 4
        out["host"] += place.host(n) * 4
    return out


def _training_state_bytes(
    config: RunConfig,
    launch: LaunchPlan,
    layout: ModelLayout,
    place: _Placement,
    compute: str,
    lora: list[tuple[str, int]],
    device: str,
    ds: dict[str, int],
) -> dict[str, Any]:
    """Per-GPU bytes of gradients, optimizer state, DeepSpeed's fp32 master partition, communication buckets
    and ZeRO-3's gathered weights; plus ``paged`` (optimizer state in CUDA unified memory), ``host`` (offloaded
    to host memory) and the optimizer's ``name`` (DeepSpeed's CPU Adam under ZeRO-Offload)."""
    name = "deepspeed_cpu_adam" if launch.zero_stage and launch.offloads_optimizer else config.train.optimizer
    numels = [n for _, n in lora]
    out: dict[str, Any] = {"name": name, "master_weights": 0, "zero3_gathered": 0, "host": 0}
    if not launch.zero_stage:
        out["gradients"] = 4 * sum(numels)
        opt = optimizer_bytes(name, numels, step_on_device=device == "cpu")
        # qlora_dist's DDP uses gradient_as_bucket_view: the gradients live in the reducer's buckets, no copy.
        # FSDP2 all-reduces the LoRA gradients as one flat fp32 buffer, which then holds them (views).
        out["comm_buffers"] = 4 * sum(numels) if launch.strategy == "fsdp2" else 0
    else:
        # DeepSpeed hands the optimizer one flat fp32 partition of all adapter weights per rank.
        partition = -(-sum(numels) // place.world)
        out["gradients"] = 4 * partition
        opt = optimizer_bytes(name, [partition], step_on_device=device == "cpu")
        # ZeRO-2 copies its partition to fp32 for the optimizer; ZeRO-3 uses fp32 parameters as they are.
        out["master_weights"] = 4 * partition if launch.zero_stage == 2 else 0
        # The reduce bucket: reduce_bucket_size elements of the gradients' dtype (fp32), allocated for backward.
        out["comm_buffers"] = 4 * ds["reduce_bucket_size"]
        if launch.offloads_optimizer:
            out["host"] += opt["host"] + out["gradients"] + 4 * partition
            out["gradients"] = out["master_weights"] = 0
        if place.zero3:
            e, s = _DTYPE_BYTES[compute], _DTYPE_BYTES[compute]
            largest = max(
                _module_bytes(module, n, layout, e, s, config.quant.double_quant)
                for module, n in layout.module_params.items()
            )
            out["zero3_gathered"] = largest + ds["stage3_prefetch_bucket_size"] * e
    out["optimizer"] = opt["device"]
    out["paged"] = opt["paged"] if device == "cuda" else 0  # bitsandbytes pages only CUDA memory
    return out


def _notes(config: RunConfig, launch: LaunchPlan, state: dict[str, Any], ds: dict[str, int]) -> list[str]:
    notes = []
    if state["name"] != config.train.optimizer:
        notes.append(f"train.optimizer={config.train.optimizer} runs as {state['name']} under ZeRO-Offload")
    if state["paged"]:
        notes.append("paged optimizer state lives in CUDA unified memory: it can be evicted to the host")
    if launch.zero_stage and state["comm_buffers"] >= GIB:
        notes.append(
            f"DeepSpeed's reduce bucket ({ds['reduce_bucket_size']:.0e} fp32 elements) takes "
            f"{state['comm_buffers'] / GIB:.2f} GiB: a deepspeed_config_file with a smaller "
            "zero_optimization.reduce_bucket_size lowers it"
        )
    return notes


def fsdp2_gathered_bytes(config: RunConfig, layout: ModelLayout, compute: str) -> int:
    """Estimated: the weights FSDP2 holds whole at once, beyond each rank's shard: the root unit (embeddings,
    final norm, head: gathered for the whole forward and backward) plus two decoder layers (the one computing
    and the next one, prefetched). Packed NF4 data in the storage dtype, everything else in the compute dtype."""
    storage = "uint8" if config.quant.storage_dtype == "auto" else config.quant.storage_dtype
    s, e = _DTYPE_BYTES[storage], _DTYPE_BYTES[compute]
    per_layer: dict[str, int] = {}
    root = 0
    for q in layout.quantized:
        b = nf4_layer_bytes(q.numel, config.quant.double_quant, s)["packed"]
        key = _layer_of(q.name)
        if key is None:
            root += b
        else:
            per_layer[key] = per_layer.get(key, 0) + b
    for name, n, _ in layout.unquantized:
        key = _layer_of(name)
        if key is None:
            root += n * e
        else:
            per_layer[key] = per_layer.get(key, 0) + n * e
    return root + 2 * max(per_layer.values(), default=0)


def _layer_of(name: str) -> str | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return m.group(1) if m else None


def _module_bytes(name: str, elements: int, layout: ModelLayout, e: int, s_bytes: int, double_quant: bool) -> int:
    """Bytes of a module's parameters gathered whole under ZeRO-3 (packed NF4 in the storage dtype)."""
    for q in layout.quantized:
        if q.name == name:
            packed = nf4_layer_bytes(q.numel, double_quant, s_bytes)["packed"]
            return packed + (q.out_features * e if q.bias else 0)
    fused = [x for x in layout.experts if x.name.rpartition(".")[0] == name]
    if fused:  # NF4 experts: every expert's packed data
        return sum(
            x.experts * nf4_layer_bytes(x.out_features * x.in_features, double_quant, s_bytes)["packed"] for x in fused
        )
    return elements * e


def _check_strategy(config: RunConfig, launch: LaunchPlan) -> None:
    """The same refusals a launch would give (train.strategy contradicting it, ZeRO-3 settings)."""
    from .errors import ConfigError

    wanted = config.train.strategy
    name = launch.strategy
    if wanted != "auto" and wanted != name and not (wanted == "ddp" and name == "single"):
        raise ConfigError(f"train.strategy={wanted} but the launch config gives {name}: set train.strategy=auto")
    if launch.strategy == "fsdp2":
        from .strategies.fsdp2 import FSDP2Strategy

        FSDP2Strategy.from_env(launch.to_env()).check(config)
    if launch.zero_stage:
        from .strategies.deepspeed import DeepSpeedStrategy

        DeepSpeedStrategy(
            stage=launch.zero_stage,
            offload_optimizer=launch.offload_optimizer,
            offload_param=launch.offload_param,
            zero3_init=launch.zero3_init,
        ).check(config)


def _deepspeed_sizes(launch: LaunchPlan, layout: ModelLayout) -> dict[str, int]:
    """DeepSpeed's sizes, with ``auto`` filled in as accelerate does (from the hidden size)."""
    h = layout.hidden
    auto = {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }
    return {k: (auto[k] if v < 0 else v) for k, v in launch.deepspeed.items()}


def _largest_batch(total, budget: int, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose total fits ``budget`` (0 when not even one does)."""
    if total(1) > budget:
        return 0
    low, high = 1, 2
    while high <= limit and total(high) <= budget:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= budget else (low, mid)
    return low


# ----------------------------------------------------------------------------------------------------------
# Output


def format_plan(plan: MemoryPlan) -> str:
    """The human table: one line per item in GiB (2 decimals), then the verdict and the host RAM."""
    m, b = plan.model, plan.per_gpu_bytes
    ckpt = "on" if plan.gradient_checkpointing else "off"
    lines = [
        f"model: {m['name_or_path']} ({m['model_type']}, {m['params'] / 1e9:.2f}B params, "
        f"{m['quantized_layers']} 4-bit layers, LoRA {m['lora_params'] / 1e6:.1f}M params)",
        f"strategy: {plan.strategy} on {plan.gpus} GPU(s), device {plan.device}, compute {plan.compute_dtype}, "
        f"optimizer {plan.optimizer}",
        f"micro-batch {plan.micro_batch_size} x {plan.max_length} tokens, gradient checkpointing {ckpt}",
        "",
        f"{'per GPU':<54}{'GiB':>9}",
    ]
    for key, label in ITEMS:
        if key == "activations":
            flip = "off" if plan.gradient_checkpointing else "on"
            other = b[f"activations_{'without' if plan.gradient_checkpointing else 'with'}_checkpointing"]
            label = f"activations (checkpointing {ckpt}; {flip}: {other / GIB:.2f})"
        elif key == "optimizer":
            label = f"optimizer state ({plan.optimizer})"
        elif b[key] == 0 and key in ("master_weights", "comm_buffers", "zero3_gathered", "fsdp2_gathered", "overhead"):
            continue
        lines.append(f"  {label:<52}{b[key] / GIB:>9.2f}")
    lines.append(f"  {'total':<52}{b['total'] / GIB:>9.2f}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += [
        "",
        f"{verdict} in {plan.gpu_memory_bytes / GIB:.2f} GiB per GPU; largest micro-batch that fits: {plan.max_micro_batch}",
        f"host RAM per node while loading: {plan.host['host_ram_bytes'] / GIB:.2f} GiB "
        f"({plan.host['host_ram_bytes'] // max(plan.host['per_process'], 1)} process(es) x "
        f"{plan.host['per_process'] / GIB:.2f} GiB; checkpoint {plan.host['checkpoint_bytes'] / GIB:.2f} GiB in page cache)",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_command(
    config_path: str,
    overrides: list[str],
    gpus: int | None,
    gpu_memory: str,
    launch_config: str | None,
    device: str,
    as_json: bool,
) -> str:
    """What ``qlora-dist plan`` prints."""
    from .config import load_config

    config = load_config(config_path, overrides)
    launch = read_launch_config(launch_config) if launch_config else None
    plan = plan_memory(config, launch, gpus, parse_memory(gpu_memory), device)
    coverage, line = _quantized_share(config, device)
    if as_json:
        return json.dumps({**plan.to_dict(), "quantization": coverage}, indent=2)
    return format_plan(plan) + "\n" + line


def _quantized_share(config: RunConfig, device: str) -> tuple[dict[str, Any], str]:
    """The meta model's predicted share of the base held in 4-bit (``quant/coverage.py``): the report section
    and the line the table ends with (it says so when the base is not QLoRA)."""
    import torch

    from .model import resolve_dtype
    from .quant import coverage

    compute = resolve_dtype(config.quant.compute_dtype, torch.device(device))
    predicted, model_type = coverage.predict_for(config.model, config.quant, compute)
    reason = coverage.refusal(predicted, model_type)
    line = f"4-bit: {predicted.summary()}" + (f"\nNOT QLoRA: {reason}" if reason else "")
    return predicted.to_report(config.quant.allow_unquantized), line


def launch_from_env(env: dict[str, str] | None = None) -> LaunchPlan:
    """The launch this process runs under, from the variables ``accelerate launch`` sets (as the strategies
    read them); a plain process is a single-process run."""
    import os

    env = dict(os.environ) if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return LaunchPlan(
            strategy="fsdp2",
            num_processes=world,
            fsdp={k: v for k, v in env.items() if k.startswith("FSDP_")},
            mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no"),
            source="environment",
        )
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return LaunchPlan(strategy="ddp" if world > 1 else "single", num_processes=world, source="environment")
    return LaunchPlan(
        strategy=f"zero{int(env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2'))}",
        num_processes=world,
        num_machines=int(env.get("ACCELERATE_NUM_MACHINES", env.get("NUM_MACHINES", "1")) or 1),
        offload_optimizer=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower(),
        offload_param=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower(),
        zero3_init=env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true",
        source="environment",
    )


def doctor_verdict(
    config_path: str | None, overrides: list[str] | None, launch_config: str | None, num_processes: int | None
) -> str | tuple[str, str]:
    """``qlora-dist check``'s memory line on a GPU machine: the plan against this GPU's memory.

    Not fitting is a warning, not an error: the plan is an estimate and must not stop a run that would fit.
    """
    import torch

    from .config import load_config

    config = load_config(config_path, overrides)
    launch = read_launch_config(launch_config) if launch_config else launch_from_env()
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    plan = plan_memory(config, launch, num_processes, memory, "cuda")
    need, have = plan.per_gpu_bytes["total"] / GIB, memory / GIB
    text = f"planned {need:.1f} GiB per GPU of {have:.1f} GiB ({plan.strategy}, {plan.gpus} GPU(s))"
    if not plan.fits:
        if plan.max_micro_batch:
            hint = f"set train.micro_batch_size={plan.max_micro_batch} or less"
        else:
            hint = "use ZeRO-3 or more GPUs"
        return "warning", f"{text}: may not fit; {hint} (qlora-dist plan for the table)"
    return f"{text}; largest micro-batch that fits: {plan.max_micro_batch}"
