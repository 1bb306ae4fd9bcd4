"""DDP (and the single-process case): every rank holds the whole NF4 base; LoRA gradients are all-reduced."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..distributed import GradSyncCounter


@dataclass
class DDPStrategy:
    world_size: int = 1
    shards_parameters: bool = False
    counter: GradSyncCounter = field(default_factory=GradSyncCounter)

    @classmethod
    def from_env(cls, env) -> DDPStrategy:
        return cls(world_size=int(env.get("WORLD_SIZE", "1")))

    @property
    def name(self) -> str:
        return "ddp" if self.world_size > 1 else "single"

    def check(self, config: RunConfig) -> None:
        """Nothing to refuse: every quantization and optimizer setting works under DDP."""

    def storage_dtype(self, config: RunConfig, compute_dtype: torch.dtype) -> str:
        return "uint8" if config.quant.storage_dtype == "auto" else config.quant.storage_dtype

    def optimizer_name(self, requested: str) -> str:
        return requested

    def accelerator_kwargs(self, cpu: bool) -> dict[str, Any]:
        # accelerate takes its gloo CPU path only when told it is on CPU.
        return {"cpu": cpu}

    def device_map(self, device: torch.device) -> dict[str, Any] | None:
        # The whole replica on this process's own device; never "auto" (it would spread every replica
        # over all GPUs).
        return {"": device}

    def prepare(self, accelerator, model, optimizer, micro_batch_size: int, grad_accum: int, max_grad_norm: float):
        model, optimizer = accelerator.prepare(model, optimizer)
        self.counter.attach(model)
        return model, optimizer

    def micro_step(self, model, sync: bool):
        # No all-reduce on accumulation micro-steps: DDP synchronises on the step's last backward only.
        return (
            nullcontext()
            if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            else model.no_sync()
        )

    def backward(self, accelerator, model, loss: torch.Tensor) -> None:
        accelerator.backward(loss)

    def step(self, accelerator, model, optimizer, max_grad_norm: float) -> float | None:
        norm = None
        if max_grad_norm > 0:
            norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def gathered(self, params):
        return nullcontext()

    def save_optimizer(self, folder: Path, model, optimizer, main: bool) -> None:
        # Every rank holds the same optimizer state under DDP: rank 0 writes it once.
        if main:
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_optimizer(self, folder: Path, model, optimizer) -> None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))

    def load_adapter(self, model, state: dict[str, torch.Tensor], set_state) -> None:
        with torch.no_grad():
            set_state(model, {k: v.to(next(model.parameters()).device) for k, v in state.items()})

    def comm_bytes(self) -> dict[str, int]:
        return {"grad_sync": self.counter.bytes_total, "param_gather": 0, "optimizer_gather": 0}

    def comm_seconds(self) -> float | None:
        # A single process has nothing to synchronise: no time, rather than unknown.
        return self.counter.clock.total() if self.counter.attached else 0.0
