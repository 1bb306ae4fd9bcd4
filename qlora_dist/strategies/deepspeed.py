"""DeepSpeed ZeRO-2 and ZeRO-3 (optionally with CPU offload) for a 4-bit base with LoRA adapters.

The traps this module handles so the user does not have to:

- accelerate drops DeepSpeed when the ``Accelerator`` is told ``cpu=True``; on a machine without a GPU the
  process group backend is named instead (gloo), see ``distributed.make_accelerator``.
- ZeRO-3 partitions parameters by dtype: the packed 4-bit weights must be stored in the compute dtype
  (``bnb_4bit_quant_storage``), they are loaded with no ``device_map`` (transformers 5.24 does not build a
  quantized model under ``zero.Init``: each rank loads its whole 4-bit base on its device, and
  ``deepspeed.initialize`` partitions it), and anything that reads whole weights (checksums, saving the adapter,
  the merge) gathers them first.
- DeepSpeed scales the loss by 1/accumulation-steps in ``backward``; the loop already normalises by the
  tokens of the global batch, so that scaling is switched off (``scale_wrt_gas=False``).
- ZeRO-Offload refuses client optimizers that are not DeepSpeed's CPU Adam: bitsandbytes optimizers are
  replaced by ``DeepSpeedCPUAdam`` (AdamW mode) under offload, and the log says so once.
- DeepSpeed's own checkpoints are loaded with ``torch.load(weights_only=False)``: a replaced file would run
  code on resume. Checkpoints here hold each rank's optimizer share as plain tensors instead (``zero/``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..distributed import CommClock, on_cpu
from ..errors import ConfigError, UserError

log = logging.getLogger(__name__)

CPU_ADAM = "deepspeed_cpu_adam"


@dataclass
class DeepSpeedStrategy:
    stage: int = 2
    offload_optimizer: str = "none"
    offload_param: str = "none"
    zero3_init: bool = False
    counter: DeepSpeedCommCounter = field(default_factory=lambda: DeepSpeedCommCounter())

    @classmethod
    def from_env(cls, env=None) -> DeepSpeedStrategy:
        """Read the settings accelerate's launcher exported from the launch config."""
        env = os.environ if env is None else env
        return cls(
            stage=int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
            offload_optimizer=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower(),
            offload_param=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower(),
            zero3_init=env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true",
        )

    @property
    def name(self) -> str:
        return f"zero{self.stage}"

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    @property
    def offloaded(self) -> bool:
        return self.offload_optimizer not in ("none", "") or self.offload_param not in ("none", "")

    def check(self, config: RunConfig) -> None:
        if self.stage not in (2, 3):
            raise ConfigError(
                f"DeepSpeed ZeRO stage {self.stage} is not supported with a 4-bit base: use "
                "launch_configs/deepspeed_zero2.yaml or deepspeed_zero3.yaml"
            )
        quant = config.quant
        if self.stage == 3:
            if not self.zero3_init:
                raise ConfigError(
                    "ZeRO-3 without zero3_init_flag is not supported (untested: transformers then does not know "
                    "ZeRO-3 is on while loading and saving): set deepspeed_config.zero3_init_flag: true in the "
                    "launch config (as launch_configs/deepspeed_zero3.yaml does)"
                )
            if (
                quant.storage_dtype != "auto"
                and quant.compute_dtype != "auto"
                and quant.storage_dtype != quant.compute_dtype
            ):
                raise ConfigError(
                    f"quant.storage_dtype={quant.storage_dtype} differs from quant.compute_dtype={quant.compute_dtype}: "
                    "ZeRO-3 can only partition the packed 4-bit weights stored in the compute dtype; "
                    "set quant.storage_dtype=auto"
                )
            if quant.storage_dtype == "uint8":
                raise ConfigError(
                    "quant.storage_dtype=uint8 cannot be partitioned by ZeRO-3 (it needs the compute dtype): "
                    "set quant.storage_dtype=auto"
                )
        if self.offload_param not in ("none", "") and self.stage != 3:
            raise ConfigError("offload_param_device needs ZeRO-3: use launch_configs/deepspeed_zero3_offload.yaml")

    def storage_dtype(self, config: RunConfig, compute_dtype: torch.dtype) -> str:
        if self.stage == 3:
            return str(compute_dtype).replace("torch.", "")
        return "uint8" if config.quant.storage_dtype == "auto" else config.quant.storage_dtype

    def optimizer_name(self, requested: str) -> str:
        # ZeRO-Offload refuses client optimizers that are not DeepSpeed's CPU Adam (zero_force_ds_cpu_optimizer).
        if self.offload_optimizer not in ("none", "") and requested != CPU_ADAM:
            return CPU_ADAM
        return requested

    def accelerator_kwargs(self, cpu: bool) -> dict[str, Any]:
        # Never cpu=True: accelerate would silently fall back to plain CPU DDP. On a CPU-only machine the
        # gloo backend named in make_accelerator is what makes DeepSpeed's process group span the ranks.
        return {"cpu": False}

    def device_map(self, device: torch.device) -> dict[str, Any] | None:
        # ZeRO-3: no device_map (bitsandbytes' quantizer picks this rank's device; deepspeed.initialize
        # partitions the 4-bit base, transformers 5.24 never uses zero.Init for it); ZeRO-2: a whole replica.
        return None if self.stage == 3 else {"": device}

    def prepare(self, accelerator, model, optimizer, micro_batch_size: int, grad_accum: int, max_grad_norm: float):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = grad_accum
        ds["train_batch_size"] = micro_batch_size * grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = max_grad_norm
        # bitsandbytes optimizers are not on DeepSpeed's tested list; they run on its flat partitions.
        ds["zero_allow_untested_optimizer"] = True
        model, optimizer = accelerator.prepare(model, optimizer)
        self.counter.install()
        return model, optimizer

    def micro_step(self, model, sync: bool):
        # Tell the engine explicitly which backward ends the step: the last step of an epoch may have fewer
        # micro-batches than grad_accum, which DeepSpeed's own counter would get wrong.
        model.set_gradient_accumulation_boundary(sync)
        return self.counter.phase("micro")

    def backward(self, accelerator, model, loss: torch.Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)

    def step(self, accelerator, model, optimizer, max_grad_norm: float) -> float | None:
        with self.counter.phase("step"):
            model.step()  # clips (gradient_clipping), steps the optimizer and zeroes the gradients
        norm = model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def gathered(self, params):
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    def comm_bytes(self) -> dict[str, int]:
        return dict(self.counter.bytes)

    def comm_seconds(self) -> float | None:
        return self.counter.clock.total()

    def save_optimizer(self, folder: Path, model, optimizer, main: bool) -> None:
        # Not the engine's save_checkpoint: DeepSpeed loads its own files with torch.load(weights_only=False),
        # which runs whatever pickle a replaced file holds. For QLoRA the trainable state is small, so each rank
        # writes its own share as plain tensors: the wrapped optimizer's state over this rank's flat fp32
        # partitions, the partitions themselves (the fp32 master weights) and a few counters. The adapter
        # itself is in adapter/ (safetensors), the frozen base is the model on disk.
        zero = model.optimizer
        with self._fp32_param_groups(zero):
            base = zero.optimizer.state_dict()
        scaler = {k: v for k, v in vars(getattr(zero, "loss_scaler", object())).items() if _is_number(v)}
        payload = {
            "base_optimizer": base,
            "fp32_partitions": [t.detach().to("cpu").clone() for t in self._fp32_partitions(zero)],
            "loss_scaler": scaler,
            "engine": {k: int(getattr(model, k, 0)) for k in _ENGINE_COUNTERS},
            "world_size": int(model.world_size),
        }
        (folder / "zero").mkdir(exist_ok=True)
        torch.save(payload, folder / "zero" / f"rank-{model.global_rank}.pt")

    def load_optimizer(self, folder: Path, model, optimizer) -> None:
        saved_world = json.loads((folder / "state.json").read_text())["world_size"]
        if saved_world != model.world_size:
            raise UserError(
                f"checkpoint {folder} was written by {saved_world} DeepSpeed ranks and cannot be resumed on "
                f"{model.world_size}: relaunch with --num_processes {saved_world}, or set train.resume=never"
            )
        payload = torch.load(folder / "zero" / f"rank-{model.global_rank}.pt", weights_only=True, map_location="cpu")
        zero = model.optimizer
        with self._fp32_param_groups(zero):
            zero.optimizer.load_state_dict(payload["base_optimizer"])
        partitions = self._fp32_partitions(zero)
        if len(partitions) != len(payload["fp32_partitions"]):
            raise UserError(f"checkpoint {folder} does not match this model's trainable parameters")
        for current, saved in zip(partitions, payload["fp32_partitions"], strict=True):
            current.data.copy_(saved.to(current.device))
        if self.stage == 3:
            _push_fp32_to_zero3_params(zero)
        for k, v in payload["loss_scaler"].items():
            setattr(zero.loss_scaler, k, v)
        for k, v in payload["engine"].items():
            setattr(model, k, v)

    def load_adapter(self, model, state: dict[str, torch.Tensor], set_state) -> None:
        """ZeRO-2 holds whole trainable weights on every rank: write them like DDP. Under ZeRO-3 they are
        partitioned and come back from the fp32 partitions in ``load_optimizer``."""
        if self.stage != 3:
            with torch.no_grad():
                set_state(model, {k: v.to(next(model.parameters()).device) for k, v in state.items()})

    def _fp32_partitions(self, zero) -> list[torch.Tensor]:
        return zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups

    @contextmanager
    def _fp32_param_groups(self, zero):
        # ZeRO-3 keeps its wrapped optimizer's param groups empty between steps; they hold the fp32 partitions
        # only while it steps (and while DeepSpeed itself saves or loads).
        if self.stage != 3:
            yield
            return
        zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            zero._clear_fp32_optimizer_param_groups()


_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, bool))


def _push_fp32_to_zero3_params(zero) -> None:
    """The restored fp32 master partitions into the (compute-dtype) parameter partitions, then whole again
    where ZeRO-3 keeps small parameters whole on every rank: what DeepSpeed's own rigid load does."""
    for fp32, flat in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat, strict=True):
        if fp32.numel() > 0:
            flat.data.copy_(fp32.data)
    for sub_group, flat in enumerate(zero.fp16_partitioned_groups_flat):
        params = zero.fp16_partitioned_groups[sub_group]
        for partitioned, updated in zip(params, zero.unflatten(flat, params), strict=True):
            partitioned.data = updated.data
    if zero.persistent_parameters:
        zero.persistent_parameters[0].partition(zero.persistent_parameters)
    zero.checkpoint_event_epilogue()


class DeepSpeedCommCounter:
    """Counts the bytes of DeepSpeed's collectives by wrapping its communication backend's methods.

    - ``grad_sync``: gradient reductions (all-reduce, reduce, reduce-scatter), input bytes.
    - ``param_gather``: all-gathers during forward/backward (ZeRO-3 fetching sharded weights).
    - ``optimizer_gather``: all-gathers inside the optimizer step (updated partitions sent back to all ranks).
    Only calls made inside a training micro-step or optimizer step count (the loop marks them); evaluation,
    checkpoint saves and the final gathers do not. Single-element reductions (gradient norms, overflow flags)
    are bookkeeping, not gradient traffic, and are left out.
    """

    REDUCE = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")
    GATHER = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced")

    def __init__(self) -> None:
        self.bytes = {"grad_sync": 0, "param_gather": 0, "optimizer_gather": 0}
        self.clock = CommClock(measured=on_cpu())
        self._phase = threading.local()
        self._installed = False

    @contextmanager
    def phase(self, name: str):
        previous = getattr(self._phase, "name", None)
        self._phase.name = name
        try:
            yield
        finally:
            self._phase.name = previous

    def install(self) -> None:
        if self._installed:
            return
        from deepspeed import comm

        backend = comm.comm.cdb
        for name in self.REDUCE + self.GATHER:
            original = getattr(backend, name, None)
            if original is not None:
                setattr(backend, name, self._wrap(name, original))
        self._installed = True

    def _wrap(self, name: str, original):
        is_reduce = name in self.REDUCE

        def counted(*args, **kwargs):
            phase = getattr(self._phase, "name", None)
            if phase is None:  # training traffic only: not eval, checkpoint saves or the final gathers
                return original(*args, **kwargs)
            nbytes, numel = _payload(name, args, kwargs)
            if is_reduce:
                if numel > 1:
                    self.bytes["grad_sync"] += nbytes
            elif phase == "step":
                self.bytes["optimizer_gather"] += nbytes
            else:
                self.bytes["param_gather"] += nbytes
            self.clock.start()
            try:
                work = original(*args, **kwargs)
            except BaseException:
                self.clock.stop()
                raise
            # An async op returns a work handle: the clock stops when it completes, not when it was issued.
            if hasattr(work, "get_future"):
                self.clock.after(work.get_future())
            else:
                self.clock.stop()
            return work

        return counted


# Which argument holds the payload: (position, keyword names). Reductions count their input, gathers their
# (whole) output. Positions are those of DeepSpeed's TorchBackend methods.
_PAYLOAD_ARG = {
    "all_reduce": (0, ("tensor",)),
    "reduce": (0, ("tensor",)),
    "all_reduce_coalesced": (0, ("tensors",)),
    "reduce_scatter": (1, ("input_list",)),
    "reduce_scatter_tensor": (1, ("input_tensor",)),
    "all_gather": (0, ("tensor_list",)),
    "all_gather_into_tensor": (0, ("output_tensor",)),
    "all_gather_base": (0, ("output_tensor",)),
    "all_gather_coalesced": (0, ("output_tensors",)),
}


def _payload(op: str, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(bytes, elements) an op moves."""
    position, names = _PAYLOAD_ARG[op]
    value = next((kwargs[n] for n in names if n in kwargs), None)
    if value is None:
        value = args[position]
    tensors = [value] if torch.is_tensor(value) else list(value)
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)
