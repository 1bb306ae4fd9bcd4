"""Callbacks on training events: log, or stop a run, without touching the loop.

A callback is any object with some of these methods (missing ones are skipped), each given an
:class:`Event`::

    on_step_end(event)          after each optimizer step (event.metrics: step, loss, lr, ...)
    on_evaluate(event)          after an evaluation (event.metrics["eval_loss"])
    on_checkpoint_saved(event)  after a checkpoint is complete (event.path)
    on_run_end(event)           after the report is written (event.report; main process only)

Setting ``event.stop = True`` in ``on_step_end`` or ``on_evaluate`` ends the run cleanly after this step:
final checkpoint, eval, merge and report as at a normal end. The decision is all-reduced, so every rank stops
at the same step even if only one callback on one rank asked.

Callbacks are named in ``train.callbacks`` and resolved through the ``callbacks`` registry: built-ins, an
installed package's ``qlora_dist.callbacks`` entry point, or ``package.module:attribute``. A class is
instantiated with no arguments; any other object is used as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import Registry

log = logging.getLogger(__name__)

CALLBACKS: Registry[Any] = Registry("callbacks")

EVENTS = ("on_step_end", "on_evaluate", "on_checkpoint_saved", "on_run_end")


@dataclass
class Event:
    """What a callback sees."""

    name: str
    step: int
    rank: int
    world_size: int
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    report: dict[str, Any] | None = None
    stop: bool = False
    """Set to True to end the run after this step."""

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


class Callbacks:
    """The run's callbacks, called in the order ``train.callbacks`` lists them."""

    def __init__(self, names: list[str]) -> None:
        self.items = [_instantiate(CALLBACKS.get(name)) for name in names]
        self.names = list(names)

    def __bool__(self) -> bool:
        return bool(self.items)

    def fire(self, event: Event) -> bool:
        """Call ``event.name`` on every callback that has it; returns whether one asked to stop."""
        for callback in self.items:
            handler = getattr(callback, event.name, None)
            if handler is not None:
                handler(event)
        return event.stop


def _instantiate(obj: Any) -> Any:
    return obj() if isinstance(obj, type) else obj


@CALLBACKS.register("stop_on_nan")
class StopOnNonFiniteLoss:
    """Built-in: end the run (cleanly, with a checkpoint) when the training loss is NaN or infinite."""

    def on_step_end(self, event: Event) -> None:
        loss = event.metrics.get("loss")
        if loss is not None and not (loss == loss and abs(loss) != float("inf")):
            log.warning("loss is %s at step %d: stopping the run", loss, event.step)
            event.stop = True
