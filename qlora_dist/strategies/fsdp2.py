"""PyTorch FSDP2 (``fully_shard``) for a 4-bit base with LoRA adapters: the frozen NF4 base sharded, LoRA replicated.

What QLoRA needs is not what full fine-tuning needs. The base is frozen and big: sharding it divides its memory
by the world size, at the price of an all-gather per decoder layer per forward (and per backward, which needs
the weights for the input gradients). The LoRA weights and their optimizer state are tiny: sharding them saves
almost nothing, turns them into DTensors (which bitsandbytes' 8-bit and paged optimizers cannot step), and
makes the optimizer depend on FSDP's parameter objects. So every LoRA weight is left out of FSDP
(``ignored_params``) and kept whole on every rank, and its gradients are all-reduced once per optimizer step
here, as DDP would. ``benchmarks/fsdp2_lora_placement.py`` measures the alternative (LoRA sharded too);
BENCHMARKS.md has the numbers this choice rests on.

One code path on every device: ``fully_shard`` is applied here (per decoder layer, then the root) with the
settings of the launch config's ``fsdp_config``, which accelerate's launcher exports as ``FSDP_*`` variables.
The model never goes through ``accelerator.prepare``, so accelerate's own FSDP code (which does not engage on
a machine without CUDA at all) is never used, and the CPU tests run exactly what a GPU run runs.

The traps handled here:

- Under a mixed-precision policy FSDP casts every floating-point parameter to ``param_dtype``, the packed
  4-bit storage included, and bitsandbytes then reads garbage shapes: the storage dtype must equal
  ``param_dtype`` or be ``uint8`` (refused in :meth:`FSDP2Strategy.check`).
- A sharded parameter is a new object without bitsandbytes' ``quant_state``; it is put back on it (from the
  layer, where bitsandbytes keeps a copy for FSDP) so checksums over the gathered base see the same bytes.
- FSDP1 (``fsdp_version: 1``, accelerate's default) does not run a 4-bit base on CPU (``Inconsistent compute
  device``, then a segfault in its state-dict code, in the probe behind issue 12): refused.
- ``fsdp_cpu_ram_efficient_loading`` makes transformers load empty weights on every rank but 0 and broadcast
  later, which a 4-bit base quantized at load cannot take: refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..distributed import CommClock
from ..errors import ConfigError
from .ddp import DDPStrategy

log = logging.getLogger(__name__)

_MIXED = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def launched_with_fsdp(env: Mapping[str, str]) -> bool:
    return env.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    return env.get(name, str(default)).lower() == "true"


@dataclass
class FSDP2Strategy:
    """The launch config's ``fsdp_config`` (as accelerate's launcher exports it) and the run's FSDP2 state."""

    world_size: int = 1
    version: int = 2
    """``fsdp_version``: only 2 is supported."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (gather again in backward): less memory, more traffic."""
    offload_params: bool = False
    cpu_ram_efficient_loading: bool = False
    activation_checkpointing: bool = False
    auto_wrap_policy: str = "TRANSFORMER_BASED_WRAP"
    layer_classes: tuple[str, ...] = ()
    """``fsdp_transformer_layer_cls_to_wrap``; empty: the model's own decoder layer classes (``_no_split_modules``)."""
    mixed_precision: str = "no"
    """accelerate's ``mixed_precision``: ``bf16`` becomes FSDP's ``param_dtype`` (gradients reduced in fp32)."""
    shards_parameters: bool = True
    counter: FSDP2CommCounter = field(default_factory=lambda: FSDP2CommCounter())
    _lora: list[torch.nn.Parameter] = field(default_factory=list)

    name = "fsdp2"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FSDP2Strategy:
        env = os.environ if env is None else env
        classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
        return cls(
            world_size=int(env.get("WORLD_SIZE", "1")),
            version=int(env.get("FSDP_VERSION", "1")),  # accelerate's default when the file does not say
            reshard_after_forward=_flag(env, "FSDP_RESHARD_AFTER_FORWARD", True),
            offload_params=_flag(env, "FSDP_OFFLOAD_PARAMS"),
            cpu_ram_efficient_loading=_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING"),
            activation_checkpointing=_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"),
            auto_wrap_policy=env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP") or "TRANSFORMER_BASED_WRAP",
            layer_classes=classes,
            mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
        )

    @property
    def param_dtype(self) -> torch.dtype | None:
        return _MIXED.get(self.mixed_precision)

    # -- refusals -----------------------------------------------------------------------------------------

    def check(self, config: RunConfig) -> None:
        """Refuse what cannot work with a 4-bit base under FSDP2, naming the setting to change."""
        if self.version != 2:
            raise ConfigError(
                f"fsdp_version: {self.version} (FSDP1) is not supported with a 4-bit base (qlora_dist shards with "
                "FSDP2's fully_shard; FSDP1 fails on CPU with 'Inconsistent compute device'): set "
                "fsdp_config.fsdp_version: 2 (as launch_configs/fsdp2.yaml does)"
            )
        if self.mixed_precision not in _MIXED:
            raise ConfigError(f"mixed_precision: {self.mixed_precision} is not supported with fsdp2: use no or bf16")
        if self.mixed_precision == "fp16":
            raise ConfigError(
                "mixed_precision: fp16 under fsdp2 has no loss scaling here (gradients would underflow): set "
                "mixed_precision: bf16, or 'no' and quant.compute_dtype"
            )
        if self.cpu_ram_efficient_loading:
            raise ConfigError(
                "fsdp_cpu_ram_efficient_loading: true loads empty weights on every rank but 0, which a base quantized "
                "to 4 bits while it loads cannot take: set fsdp_config.fsdp_cpu_ram_efficient_loading: false"
            )
        if self.offload_params:
            raise ConfigError(
                "fsdp_offload_params: true is not supported with a 4-bit base under fsdp2: set it to false, or use "
                "launch_configs/deepspeed_zero3_offload.yaml"
            )
        if self.activation_checkpointing:
            raise ConfigError(
                "fsdp_activation_checkpointing: true wraps layers a second time: set it to false and use "
                "train.gradient_checkpointing=true (the run config) instead"
            )
        if self.auto_wrap_policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
            raise ConfigError(
                f"fsdp_auto_wrap_policy: {self.auto_wrap_policy}: fsdp2 shards per decoder layer; set "
                "fsdp_config.fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"
            )
        storage = self.storage_dtype(config, _compute_dtype_hint(config))
        if self.param_dtype is not None and storage not in ("uint8", _name(self.param_dtype)):
            raise ConfigError(
                f"quant.storage_dtype={config.quant.storage_dtype} (stored as {storage}) under mixed_precision: "
                f"{self.mixed_precision}: FSDP would cast the packed 4-bit weights to {_name(self.param_dtype)} and "
                f"break them; set quant.storage_dtype=uint8 (or {_name(self.param_dtype)})"
            )

    # -- loading ------------------------------------------------------------------------------------------

    def storage_dtype(self, config: RunConfig, compute_dtype: torch.dtype) -> str:
        # uint8 is never cast by a mixed-precision policy, and FSDP2 shards it like any other dtype.
        return "uint8" if config.quant.storage_dtype == "auto" else config.quant.storage_dtype

    def optimizer_name(self, requested: str) -> str:
        # LoRA stays whole (plain tensors): every optimizer, bitsandbytes' included, steps it as under DDP.
        return requested

    def accelerator_kwargs(self, cpu: bool) -> dict[str, Any]:
        # The process group is all that is wanted from accelerate (gloo on CPU, NCCL on GPU); the model is
        # never prepared by it.
        return {"cpu": cpu}

    def device_map(self, device: torch.device) -> dict[str, Any] | None:
        # Every rank loads and quantizes the whole base on its device, then fully_shard frees all but its share.
        return {"": device}

    # -- training -----------------------------------------------------------------------------------------

    def prepare(self, accelerator, model, optimizer, micro_batch_size: int, grad_accum: int, max_grad_norm: float):
        self._lora = [p for p in model.parameters() if p.requires_grad]
        shard_model(
            model,
            accelerator.device,
            accelerator.num_processes,
            reshard_after_forward=self.reshard_after_forward,
            param_dtype=self.param_dtype,
            layer_classes=self.layer_classes or None,
            counter=self.counter,
            shard_lora=False,
        )
        return model, optimizer

    def micro_step(self, model, sync: bool):
        return self.counter.phase()

    def backward(self, accelerator, model, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, accelerator, model, optimizer, max_grad_norm: float) -> float | None:
        self._all_reduce_lora_grads()
        norm = None
        if max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self._lora, max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _all_reduce_lora_grads(self) -> None:
        """Average the LoRA gradients over ranks: one flat all-reduce per optimizer step (the loss is already
        scaled by world size over the global batch's tokens, as for DDP)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1 or not self._lora:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._lora]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.counter.grad_sync += flat.numel() * flat.element_size()
        self.counter.clock.start()
        try:
            dist.all_reduce(flat)
        finally:
            self.counter.clock.stop()
        flat /= world
        offset = 0
        for p, g in zip(self._lora, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g)  # views: the flat buffer holds the gradients now
            offset += n

    def gathered(self, params):
        # Replicated LoRA needs nothing; sharded base weights are read whole by model.base_checksum, which
        # gathers DTensors itself (a collective every rank joins).
        return nullcontext()

    def comm_bytes(self) -> dict[str, int]:
        return {"grad_sync": self.counter.grad_sync, "param_gather": self.counter.param_gather, "optimizer_gather": 0}

    def comm_seconds(self) -> float | None:
        return self.counter.clock.total()

    # -- checkpoints: LoRA and its optimizer state are whole and equal on every rank, as under DDP -----------

    def save_optimizer(self, folder: Path, model, optimizer, main: bool) -> None:
        DDPStrategy.save_optimizer(self, folder, model, optimizer, main)  # type: ignore[arg-type]

    def load_optimizer(self, folder: Path, model, optimizer) -> None:
        DDPStrategy.load_optimizer(self, folder, model, optimizer)  # type: ignore[arg-type]

    def load_adapter(self, model, state: dict[str, torch.Tensor], set_state) -> None:
        # set_peft_model_state_dict copies into the existing (ignored, plain) LoRA tensors in place.
        DDPStrategy.load_adapter(self, model, state, set_state)  # type: ignore[arg-type]


def shard_model(
    model: torch.nn.Module,
    device: torch.device,
    world_size: int,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    layer_classes: tuple[str, ...] | None = None,
    counter: FSDP2CommCounter | None = None,
    shard_lora: bool = False,
) -> list[torch.nn.Module]:
    """``fully_shard`` every decoder layer of ``model`` (peft-wrapped or not), then the root; returns the units.

    ``shard_lora=False`` leaves every trainable weight out of FSDP (whole on every rank; the caller reduces its
    gradients). ``True`` shards them with the base (FSDP reduce-scatters their gradients; they become DTensors
    and an optimizer must be built after this call) and exists for the benchmark that measures the choice.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if not shard_lora:
        kwargs["ignored_params"] = {p for p in model.parameters() if p.requires_grad}
    names = set(layer_classes or _decoder_layer_classes(model))
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"no module of class {sorted(names)} in the model to shard per layer: set "
            "fsdp_config.fsdp_transformer_layer_cls_to_wrap to its decoder layer class"
        )
    units = [fully_shard(layer, **kwargs) for layer in layers]
    units.append(fully_shard(model, **kwargs))
    _restore_quant_state(model)
    if counter is not None:
        for unit in units:
            unit.set_custom_all_gather(counter.all_gather())
    return units


def _decoder_layer_classes(model: torch.nn.Module) -> list[str]:
    """transformers' own list of blocks that must not be split (the decoder layers)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def _restore_quant_state(model: torch.nn.Module) -> None:
    """Put bitsandbytes' quantization state back on each sharded 4-bit weight (FSDP made new parameter objects;
    bitsandbytes keeps a copy on the layer, from which its forward restores the gathered weight too)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "quant_state", None) is not None:
            module.weight.quant_state = module.quant_state
            module.weight.blocksize = module.quant_state.blocksize


class FSDP2CommCounter:
    """Bytes FSDP2 gathers during training micro-steps (forward and backward), the LoRA bytes all-reduced per
    step, and the wall time with one of them in flight. Evaluation, checksums and the final gathers happen
    outside :meth:`phase` and are not counted."""

    def __init__(self) -> None:
        from ..distributed import on_cpu

        self.grad_sync = 0
        self.param_gather = 0
        self.clock = CommClock(measured=on_cpu())
        self._training = False

    @contextmanager
    def phase(self):
        self._training = True
        try:
            yield
        finally:
            self._training = False

    def all_gather(self):
        # FSDP2's own all-gather with counting around it (set_custom_all_gather is FSDP2's hook for this).
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

        counter = self

        class Counted(DefaultAllGather):
            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                if not counter._training:
                    return super().__call__(output_tensor, input_tensor, group, async_op)
                counter.param_gather += output_tensor.numel() * output_tensor.element_size()
                counter.clock.start()
                try:
                    work = super().__call__(output_tensor, input_tensor, group, async_op)
                except BaseException:
                    counter.clock.stop()
                    raise
                if work is not None and hasattr(work, "get_future"):
                    counter.clock.after(work.get_future())
                else:
                    counter.clock.stop()
                return work

        return Counted()


def _compute_dtype_hint(config: RunConfig) -> torch.dtype:
    from ..model import _DTYPES

    return _DTYPES.get(config.quant.compute_dtype, torch.float32)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
