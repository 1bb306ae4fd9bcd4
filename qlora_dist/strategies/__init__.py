"""Distribution strategies: what changes between DDP, DeepSpeed ZeRO and FSDP2, in one small protocol.

The launch config (accelerate's, in ``launch_configs/``) decides the strategy; ``resolve_strategy`` reads it
from the environment accelerate's launcher sets, before anything heavy loads, and refuses a run config
that contradicts it (``train.strategy``) or a combination known to fail.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..registry import Registry


class Strategy(Protocol):
    """Everything the training loop and the plugin ask of a distribution strategy."""

    name: str
    """``single``, ``ddp``, ``zero2``, ``zero3`` or ``fsdp2`` (``run_report.json``'s ``strategy``)."""
    shards_parameters: bool
    """True when each rank holds only a share of every parameter (ZeRO-3), or of the frozen base (FSDP2)."""

    def check(self, config: RunConfig) -> None:
        """Refuse known-bad combinations before anything loads (ConfigError naming the setting to change)."""

    def storage_dtype(self, config: RunConfig, compute_dtype: torch.dtype) -> str:
        """The 4-bit storage dtype to load with (ZeRO-3 needs it equal to the compute dtype)."""

    def optimizer_name(self, requested: str) -> str:
        """The optimizer that works under this strategy (the requested one, or a replacement)."""

    def accelerator_kwargs(self, cpu: bool) -> dict[str, Any]:
        """Extra ``Accelerator`` arguments (``cpu``) for this strategy."""

    def device_map(self, device: torch.device) -> dict[str, Any] | None:
        """``from_pretrained``'s device_map: this rank's device, or None when the strategy places weights."""

    def prepare(self, accelerator, model, optimizer, micro_batch_size: int, grad_accum: int, max_grad_norm: float):
        """Wrap model and optimizer; start counting communication."""

    def micro_step(self, model, sync: bool) -> AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are synchronised when ``sync``."""

    def backward(self, accelerator, model, loss: torch.Tensor) -> None:
        """Backward of an already-normalised loss (no extra scaling by accumulation steps)."""

    def step(self, accelerator, model, optimizer, max_grad_norm: float) -> float | None:
        """Clip, step, zero the gradients; returns the gradient norm before clipping when known."""

    def gathered(self, params: list[torch.nn.Parameter]) -> AbstractContextManager:
        """Context in which ``params`` are whole on every rank (a collective under ZeRO-3)."""

    def comm_bytes(self) -> dict[str, int]:
        """Bytes counted so far: ``grad_sync``, ``param_gather``, ``optimizer_gather``."""

    def comm_seconds(self) -> float | None:
        """Seconds with a training collective in flight so far (None where it cannot be measured)."""

    def save_optimizer(self, folder, model, optimizer, main: bool) -> None:
        """Write the optimizer state into a checkpoint folder (every rank calls this)."""

    def load_optimizer(self, folder, model, optimizer) -> None:
        """Restore the optimizer state from a checkpoint folder (every rank calls this)."""

    def load_adapter(self, model, state, set_state) -> None:
        """Put saved adapter weights back into the (unwrapped) model."""


STRATEGIES: Registry[Any] = Registry("strategies")
"""Strategy factories by name. Built-ins follow the launch; a plugin's factory is called as ``factory(config)``
and returns an object with the :class:`Strategy` methods."""

BUILTIN_NAMES = ("auto", "ddp", "zero2", "zero3", "fsdp2")
"""The one strategy vocabulary: ``train.strategy``, ``qlora-dist plugins``, the report and the README use these
(plus ``single``, what ``ddp`` is with one process). ``deepspeed`` is only the registry's factory for zero2/zero3."""
_FACTORIES = {"deepspeed": "zero2, zero3"}
"""Registry entries that are factories behind user-facing names, not names a run config may give."""


def check_strategy_name(name: str) -> None:
    """Refuse a ``train.strategy`` that is neither a built-in name nor a plugin (without loading any plugin)."""
    if name in BUILTIN_NAMES or ":" in name:
        return
    if name in _FACTORIES:
        raise ConfigError(
            f"train.strategy={name} is not a strategy name: the DeepSpeed strategies are zero2 and zero3 "
            "(use the one your launch config's zero_stage gives, or auto)"
        )
    if name not in STRATEGIES.names():
        plugins = [n for n in STRATEGIES.names() if n not in BUILTIN_NAMES and n not in _FACTORIES]
        raise ConfigError(
            f"train.strategy={name!r} is not allowed: choose one of {' | '.join((*BUILTIN_NAMES, *plugins))} "
            "(or install a strategy plugin, see `qlora-dist plugins`)"
        )


def user_facing_strategies() -> list[tuple[str, str]]:
    """(name, source) of every strategy a run config may name, for ``qlora-dist plugins``."""
    rows = []
    for name, source in STRATEGIES.available():
        if name in _FACTORIES:
            rows += [(n.strip(), source) for n in _FACTORIES[name].split(",")]
        else:
            rows.append((name, source))
    return [("auto", "built-in (follows the launch config)"), *sorted(rows)]


def launched_with_deepspeed(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _launched_kind(env: Mapping[str, str]) -> str:
    from .fsdp2 import launched_with_fsdp

    if launched_with_deepspeed(env):
        return "deepspeed"
    return "fsdp2" if launched_with_fsdp(env) else "ddp"


def resolve_strategy(config: RunConfig, env: Mapping[str, str] | None = None) -> Strategy:
    """The strategy the launch implies (``env``: accelerate's launch variables, default this process's),
    checked against ``train.strategy`` and the run config."""
    env = os.environ if env is None else env
    wanted = config.train.strategy
    if wanted not in BUILTIN_NAMES:
        strategy: Strategy = STRATEGIES.get(wanted)(config)
    else:
        factory = STRATEGIES.get(_launched_kind(env))
        strategy = factory.from_env(env)
        agrees = wanted in ("auto", strategy.name) or (wanted, strategy.name) == ("ddp", "single")
        if not agrees:
            raise ConfigError(
                f"train.strategy={wanted} but the launch config gives {strategy.name}: launch with "
                f"{_LAUNCH_HINT.get(wanted, 'the matching launch config')} or set train.strategy=auto"
            )
    strategy.check(config)
    return strategy


def _register_builtins() -> None:
    from .ddp import DDPStrategy
    from .deepspeed import DeepSpeedStrategy
    from .fsdp2 import FSDP2Strategy

    STRATEGIES.register("ddp", DDPStrategy)
    STRATEGIES.register("deepspeed", DeepSpeedStrategy)
    STRATEGIES.register("fsdp2", FSDP2Strategy)


_register_builtins()

_LAUNCH_HINT = {
    "ddp": "launch_configs/multi_gpu_ddp.yaml",
    "zero2": "launch_configs/deepspeed_zero2.yaml",
    "zero3": "launch_configs/deepspeed_zero3.yaml (or deepspeed_zero3_offload.yaml)",
    "fsdp2": "launch_configs/fsdp2.yaml",
}
