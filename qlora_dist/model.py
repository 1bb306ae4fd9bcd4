"""The model side of QLoRA: a frozen 4-bit NF4 base on this process's device, with LoRA adapters on top.

Every process holds its own full NF4 replica (DDP); nothing here talks to other processes. The functions
are small and separate so that a user's own script can take just the ones it needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig, ModelConfig, QuantConfig
from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU (fp16 where the GPU has no bf16) and float32 on a CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bnb_config(quant: QuantConfig, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for a frozen 4-bit base."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=_DTYPES[quant.storage_dtype],
    )


def check_model_path(cfg: ModelConfig, remote_code: bool = True) -> Path | None:
    """Return the local folder of the model, or raise a UserError saying what is missing.

    Returns None for something that looks like a hub id (``org/name`` with no such local folder); loading
    then goes through the hub cache as usual. ``remote_code=False`` leaves out the one check that imports
    transformers (whether it knows the model type), for the checks ``train`` runs before any heavy import.
    """
    p = Path(cfg.name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model.name_or_path={cfg.name_or_path}: folder has no config.json (is it a model folder?)")
        check_not_prequantized(p / "config.json")
        if remote_code:
            check_remote_code(cfg, p / "config.json")
        check_weight_files(cfg, p)
        return p
    if p.exists():
        raise UserError(f"model.name_or_path={cfg.name_or_path}: expected a model folder, found a file")
    looks_like_hub_id = cfg.name_or_path.count("/") == 1 and not cfg.name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"model.name_or_path={cfg.name_or_path}: no such folder (give a local model folder)")
    return None


def check_remote_code(cfg: ModelConfig, config_json: Path) -> None:
    """A model whose type transformers does not know runs code shipped in its folder (``auto_map``): refuse it
    in one line, before anything loads, unless ``model.trust_remote_code`` says so."""
    import json

    from transformers import CONFIG_MAPPING

    try:
        raw = json.loads(config_json.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"model.name_or_path={cfg.name_or_path}: {config_json.name} is not valid JSON") from None
    if cfg.trust_remote_code or not isinstance(raw, dict) or raw.get("model_type") in CONFIG_MAPPING:
        return
    if raw.get("auto_map"):
        raise UserError(
            f"model.name_or_path={cfg.name_or_path}: model_type {raw.get('model_type')!r} needs the code shipped in "
            "the folder (auto_map in config.json): set model.trust_remote_code=true if you trust its source"
        )


def check_weight_files(cfg: ModelConfig, folder: Path) -> None:
    """Every ``*.safetensors`` file in the folder is whole: its header parses and the file is as long as the
    header says (a truncated download otherwise fails in the middle of loading, with a traceback)."""
    import json
    import struct

    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        problem = None
        try:
            with f.open("rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                problem = f"{size} bytes, the header says {8 + header_len + end}: truncated"
        except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            problem = f"not a readable safetensors file ({e})"
        except OSError as e:
            problem = f"cannot be read ({e.strerror})"
        if problem:
            raise UserError(f"model.name_or_path={cfg.name_or_path}: {f.name} is {problem}; download it again")


def local_copy_hint(name_or_path: str) -> str:
    """``; to use a local copy ...`` for something that looks like a hub id, else nothing."""
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        return ""
    local = "./" + name_or_path.split("/")[1]
    return (
        f"; to use a local copy, download it where a hub is reachable (hf download {name_or_path} --local-dir "
        f"{local}) and set model.name_or_path={local}, a local folder holding config.json"
    )


def check_not_prequantized(config_json: Path) -> None:
    """Refuse checkpoints already quantized by another method (GPTQ, AWQ, ...): QLoRA quantizes an
    unquantized checkpoint to NF4 itself, and a pre-quantized one cannot be re-quantized or sharded by ZeRO-3."""
    import json

    try:
        method = (json.loads(config_json.read_text()).get("quantization_config") or {}).get("quant_method")
    except (OSError, ValueError):
        return
    if method and method != "bitsandbytes":
        raise ConfigError(
            f"{config_json.parent} is pre-quantized with {method}: qlora_dist quantizes to NF4 itself; "
            "point model.name_or_path at the unquantized (fp16/bf16) checkpoint"
        )


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a pad token (falls back to eos) so batches can be padded."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir() and cfg.tokenizer.startswith((".", "/", "~")):
        raise UserError(f"model.tokenizer={cfg.tokenizer}: no such folder")
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer from {source}: {_first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_quantized_model(
    cfg: ModelConfig,
    quant: QuantConfig,
    device: torch.device,
    compute_dtype: torch.dtype,
    device_map: dict | None | bool = True,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load the base in 4-bit on ``device`` and freeze every parameter.

    ``device_map=True`` means ``{"": device}``: the whole replica on this process's own device. Never
    ``"auto"``: with more than one process that would spread every replica over all GPUs. ``None`` leaves
    placement to DeepSpeed ZeRO-3, which partitions the weights while they load. ``attn_implementation``
    None is transformers' default (sdpa); runs that pack pass :data:`qlora_dist.attention.PACKED_ATTENTION`.
    """
    from transformers import AutoModelForCausalLM

    check_model_path(cfg)
    if quant.storage_dtype == "auto":
        quant = dataclasses.replace(quant, storage_dtype="uint8")
    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is True:
        kwargs["device_map"] = {"": device}
    elif device_map:
        if device_map == "auto" and _world_size() > 1:
            raise UserError(
                'device_map="auto" with several processes spreads every replica over all GPUs and the processes '
                "fight over them: give each process its own device, device_map={'': accelerator.device}"
            )
        kwargs["device_map"] = device_map
    from .quant.layers import plain_linear_layers

    try:
        # Families whose linear class merely subclasses nn.Linear (Falcon) build plain nn.Linear layers, so
        # that bitsandbytes quantizes them too (quant/layers.py).
        with plain_linear_layers(_model_type(cfg)):
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path,
                quantization_config=bnb_config(quant, compute_dtype),
                dtype=compute_dtype,
                trust_remote_code=cfg.trust_remote_code,
                **kwargs,
            )
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError) as e:
        raise UserError(f"could not load model.name_or_path={cfg.name_or_path}: {_first_line(e)}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    disable_cpu_repack(model)
    # Fused MoE experts are no nn.Linear, so bitsandbytes left them unquantized: quantize them here, per expert.
    from .quant import moe

    moe.quantize_experts(model, quant, compute_dtype)
    return model


def disable_cpu_repack(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with AVX512-BF16.

    bitsandbytes 0.50's ``Linear4bit.forward`` converts its weight to a CPU-kernel layout the first time it
    runs in eval mode without grad. That changes the base bytes (the frozen-base checksum), and training a layer
    with a bias through the repacked weight then fails. Evaluation and merging here run in eval mode, so the
    repack is turned off once, at load.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = False) -> None:
    """Recompute activations in backward. Non-reentrant by default: the reentrant version marks DDP
    parameters ready twice ("Expected to mark a variable ready only once") and needs inputs that require grad."""
    if reentrant and _world_size() > 1:
        raise UserError(
            "reentrant gradient checkpointing under DDP fails with 'Expected to mark a variable ready only once' "
            "(and needs inputs that require grad): use the non-reentrant mode (reentrant=False)"
        )
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def linear_layer_names(model: nn.Module) -> list[str]:
    """Short names (last path component) of the linear layers LoRA can target: ``nn.Linear``, 4-bit
    ``Linear4bit`` and GPT-2's ``Conv1D``; the output head and mixture-of-experts routers excluded (a router is
    a tiny classifier whose LoRA would change which experts run, not what they compute)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    names = set()
    for name, module in modules.items():
        linear = isinstance(module, (nn.Linear, bnb.nn.Linear4bit, Conv1D)) and module is not head
        if linear and not _is_router(name, modules):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_target_names(model: nn.Module) -> list[str]:
    """The names ``lora.target_modules`` may use: the linear layers, plus ``experts`` and the fused expert
    matrices where the model's experts are (or, on a meta model, will be) held in NF4 (:mod:`qlora_dist.quant.moe`)."""
    from .quant import moe

    # A loaded model holds NF4Experts; a meta model (check, plan) still has transformers' fused experts.
    extra = moe.TARGET_NAMES if moe.has_nf4_experts(model) or moe.fused_experts(model) else ()
    return sorted({*linear_layer_names(model), *extra})


def _is_router(name: str, modules: dict[str, nn.Module]) -> bool:
    parent, _, leaf = name.rpartition(".")
    if leaf in ("router", "shared_expert_gate"):
        return True
    return leaf == "gate" and hasattr(modules.get(parent), "experts")


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The layer names peft puts LoRA on, explicitly: ``all-linear`` becomes this model's linear layer names (see
    :func:`linear_layer_names`); a list is checked against :func:`lora_target_names`. The expert names of a
    mixture of experts are taken out (their LoRA is :func:`qlora_dist.quant.moe.attach_expert_lora`'s).
    Nothing to target is an error, not an ok."""
    from .quant import moe

    available = linear_layer_names(model)
    if not available:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"lora.target_modules={cfg.target_modules}: this {kind} model has no linear layer LoRA can target "
            "(nn.Linear, Conv1D); give lora.target_modules the names of its projection modules"
        )
    check_target_modules(lora_target_names(model), cfg)
    if moe.has_nf4_experts(model) or moe.fused_experts(model):
        return moe.peft_targets(cfg.target_modules, available)
    return available if cfg.target_modules == "all-linear" else list(cfg.target_modules)


def check_target_modules(available: list[str], cfg: LoraConfig) -> None:
    """Every name in ``lora.target_modules`` must be one of the model's linear layers (else ConfigError)."""
    if cfg.target_modules == "all-linear":
        return
    missing = [m for m in cfg.target_modules if m not in available]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {', '.join(missing)} match no linear layer of this model; "
            f"its linear layers are {', '.join(available)} (or use all-linear)"
        )


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The model built from its ``config.json`` on the meta device: real names and shapes, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .merge import _without_zero3_init
    from .quant.layers import plain_linear_layers

    local = check_model_path(cfg)
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        if local is not None:
            raise
        first = (str(e).strip().splitlines() or [""])[0].rstrip(".")
        raise UserError(f"model.name_or_path={cfg.name_or_path}: {first}{local_copy_hint(cfg.name_or_path)}") from None
    # Never under ZeRO-3's zero.Init (a run's DeepSpeed config is registered by then): it would try to partition
    # meta tensors. Linear classes as load_quantized_model builds them.
    with _without_zero3_init(), init_empty_weights(), plain_linear_layers(config.model_type):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


def _model_type(cfg: ModelConfig) -> str | None:
    """``model_type`` from the checkpoint's config.json (None when it cannot be read here: a hub id)."""
    import json

    path = Path(cfg.name_or_path).expanduser() / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def attach_lora(model: nn.Module, cfg: LoraConfig):
    """Wrap ``model`` in a peft LoRA model. Only the adapter weights are trainable afterwards.

    Target names that match no linear layer are an error listing the names the model does have, because
    peft would otherwise train a different set of layers than the user asked for, or none. peft is given the
    resolved names, never ``all-linear`` (whose own rule puts LoRA on MoE routers, see :func:`resolve_targets`).
    NF4 experts get their own per-expert LoRA (:func:`qlora_dist.quant.moe.attach_expert_lora`); the router none.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from .quant import moe

    targets = resolve_targets(model, cfg)
    experts = moe.has_nf4_experts(model)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        # peft would re-target the fused experts itself (its ParamWrapper): they are NF4 and adapted here.
        with moe.without_peft_moe_remap() if experts else contextlib.nullcontext():
            peft_model = get_peft_model(model, peft_cfg)
    except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as e:
        # peft's own message, on one line, with the settings that decide what it tried to build.
        raise ConfigError(
            f"peft could not attach LoRA to {', '.join(targets)} (lora.target_modules={cfg.target_modules}, "
            f"lora.dropout={cfg.dropout}): {_first_line(e)}; change lora.target_modules (or lora.dropout)"
        ) from None
    moe.attach_expert_lora(peft_model, cfg)
    return peft_model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical number of elements."""
    trainable = total = 0
    for p in model.parameters():
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_grad_bytes(model: nn.Module) -> int:
    """Bytes of all trainable gradients of one step (what DDP must all-reduce)."""
    return sum(_logical_numel(p) * p.element_size() for p in model.parameters() if p.requires_grad)


def base_checksum(model: nn.Module, gathered=None) -> str:
    """sha256 over every frozen tensor (4-bit packed weights, their quantization state, norms, embeddings).

    Equal before and after training, and on every rank, when the base stayed frozen and untouched.
    ``gathered(params)`` is a context making sharded parameters whole (ZeRO-3); parameters are gathered one
    at a time so the whole base never has to fit at once. Under ZeRO-3 every rank must call this.
    """
    h = hashlib.sha256()
    frozen = sorted((base_param_name(n), p) for n, p in model.named_parameters() if not p.requires_grad)
    for name, p in frozen:
        with gathered([p]) if gathered is not None else contextlib.nullcontext():
            for key, tensor in _with_quant_state(name, p):
                h.update(key.encode())
                h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def local_base_bytes(model: nn.Module) -> int:
    """Bytes of frozen base weights this rank holds (its ZeRO-3 partition, or the whole replica)."""
    total = 0
    for _, p in model.named_parameters():
        if not p.requires_grad:
            held = getattr(p, "ds_tensor", p)
            held = held.to_local() if _is_dtensor(held) else held  # FSDP2: this rank's shard
            total += held.numel() * held.element_size()
    return total


def lora_checksum(model: nn.Module, gathered=None) -> str:
    """sha256 over the trainable (adapter) weights; equal on every rank when gradients were synchronised.
    ``gathered`` as in :func:`base_checksum`."""
    h = hashlib.sha256()
    trainable = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with gathered([p for _, p in trainable]) if gathered is not None else contextlib.nullcontext():
        for name, p in trainable:
            h.update(name.encode())
            h.update(_tensor_bytes(p))
    return h.hexdigest()


def _with_quant_state(name: str, p: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    out = [(name, p)]
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        for key, value in sorted(quant_state.as_dict(packed=True).items()):
            if torch.is_tensor(value):
                out.append((f"{name}.{key}", value))
    return out


def base_param_name(name: str) -> str:
    """A parameter's name in the plain base checkpoint: peft's wrapper prefix and ``.base_layer`` removed."""
    name = name.removeprefix("module.").removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if _is_dtensor(t):  # FSDP2-sharded: gathered whole (a collective: every rank checksums the same names)
        t = t.full_tensor()
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _logical_numel(p: torch.Tensor) -> int:
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves a 0-sized placeholder on the module


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
