"""Process-group plumbing: the right Accelerator for this machine, gradient-sync accounting, and gathers.

The same accelerate launch files serve GPU nodes and CPU-only machines. On a machine without CUDA,
accelerate only takes its gloo path when the ``Accelerator`` is told it is on CPU; otherwise
``--multi_gpu --num_processes 2`` silently runs two independent single-process jobs. We detect that case
here and refuse to run if the world size the launcher promised is not the one we got.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger(__name__)


def on_cpu() -> bool:
    """True when this process should train on the CPU (no CUDA, or accelerate was told ``use_cpu``)."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or not torch.cuda.is_available()


def make_accelerator(cpu: bool | None = None, timeout_minutes: int = 60, **kwargs: Any):
    """An ``Accelerator`` with the right process-group backend for this machine and a generous timeout.

    - ``cpu``: tell accelerate it is on CPU (its gloo DDP path). Defaults to "no CUDA here"; the DeepSpeed
      strategy passes False, because accelerate drops DeepSpeed when told ``cpu=True``.
    - Under a launcher the backend is named: gloo without CUDA (else DeepSpeed on CPU sees a world of 1),
      NCCL with it.
    - DDP with ``find_unused_parameters=False`` (only LoRA weights require grad, and every one is used) and
      ``gradient_as_bucket_view`` (no second copy of the gradients next to the buckets).
    The timeout covers rank 0's merge at the end, during which the other ranks have already left.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    no_cuda = on_cpu()
    cpu = no_cuda if cpu is None else cpu
    # gradient_as_bucket_view: the LoRA gradients live in DDP's buckets instead of in a second copy.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False, gradient_as_bucket_view=True)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Only under a launcher: naming a backend makes accelerate initialise a process group.
        backend = "gloo" if no_cuda else "nccl"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=timeout_minutes)))
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers + list(kwargs.pop("kwargs_handlers", [])), **kwargs)
    check_world_size(accelerator.num_processes)
    return accelerator


def check_world_size(seen: int) -> None:
    """Refuse to train when the launcher started N processes but each one formed a group of one."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if seen != expected:
        raise UserError(
            f"the launcher started {expected} processes but this one sees a world of {seen}: they would train "
            "independently. Check the launch config (distributed_type, num_processes) and the process-group backend."
        )


class CommClock:
    """Wall-clock seconds during which at least one collective was in flight.

    Each collective calls :meth:`start` when it is issued and :meth:`stop` when it has completed (from a
    completion callback for asynchronous ones). Overlapping collectives count once: the clock runs while the
    number in flight is above zero. A collective is in flight from the moment this rank enters it, so the time
    includes waiting for slower ranks to get there (load imbalance), and it may overlap computation (DDP
    all-reduces buckets while backward goes on).

    Only meaningful where the host sees completion: on CUDA, NCCL work completes on the device after the host
    has moved on, so :attr:`measured` is False there and the report says None instead of a wrong number.
    """

    def __init__(self, measured: bool = True, now: Callable[[], float] = time.perf_counter) -> None:
        self.measured = measured
        self.now = now
        self.seconds = 0.0
        self._in_flight = 0
        self._since = 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._since = self.now()
            self._in_flight += 1

    def stop(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.seconds += self.now() - self._since

    def after(self, future: torch.futures.Future) -> torch.futures.Future:
        """``future`` chained so that the clock stops when it completes; same value."""

        def done(fut: torch.futures.Future):
            try:
                return fut.value()
            finally:
                self.stop()

        return future.then(done)

    def total(self) -> float | None:
        """Seconds counted so far, or None where the host cannot see when collectives end (CUDA)."""
        return self.seconds if self.measured else None


class GradSyncCounter:
    """A DDP communication hook that all-reduces each gradient bucket and counts its bytes and time.

    DDP puts only parameters that require grad into buckets, so with a frozen base this counts exactly
    the LoRA gradients that cross the network. ``bytes_total`` grows on synchronising steps only; micro-steps
    under ``no_sync`` never call the hook.
    """

    def __init__(self) -> None:
        self.bytes_total = 0
        self.attached = False
        self.clock = CommClock()

    def attach(self, model: torch.nn.Module) -> bool:
        """Register on a DDP-wrapped model; returns False (and counts nothing) for an unwrapped one."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return False
        model.register_comm_hook(state=None, hook=self._hook)
        self.attached = True
        self.clock.measured = buffer_device(model).type == "cpu"
        return True

    def _hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        self.bytes_total += buffer.numel() * buffer.element_size()
        self.clock.start()
        return self.clock.after(default_hooks.allreduce_hook(state, bucket))


def buffer_device(model: torch.nn.Module) -> torch.device:
    """Where the trainable parameters (so the gradient buckets) of ``model`` live."""
    return next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks (one small collective); identity for a single process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_int(value: int, device: torch.device, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (a tensor, not a pickled object); identity for a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(t, src=src)
        return int(t.item())
    return value


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


_FAILED_KEY = "qlora_dist/failed_rank"
_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl")


def report_failure() -> None:
    """Tell the other ranks, through the launcher's store, that this one is failing (best effort, no wait)."""
    try:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.distributed_c10d._get_default_store().set(_FAILED_KEY, str(dist.get_rank()))
    except Exception:  # noqa: BLE001 - the store may be gone with the launcher; the error itself matters more
        pass


def peer_failure(error: BaseException) -> str | None:
    """For an error a collective raised because another rank is gone: one line saying which rank failed
    (as far as the store knows); None for any other error."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    backend_error = getattr(dist, "DistError", ()) or ()
    text = str(error).lower()
    if not isinstance(error, backend_error) and not any(w in text for w in _PEER_WORDS):
        return None
    failed = None
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.check([_FAILED_KEY]):
            failed = store.get(_FAILED_KEY).decode()
    except Exception:  # noqa: BLE001 - a store hosted by the failed rank is gone with it
        pass
    who = f"rank {failed} failed" if failed is not None else "another rank ended without saying why (killed?)"
    # gloo prefixes its messages with a source location ("[.../pair.cc:553] Connection closed by peer ...").
    first = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(error).split()))[:120]
    return f"{who}: this rank stopped too ({first}); see that rank's own error above, or the launcher's log"


def leave_process_group(accelerator) -> None:
    """Barrier, then destroy the default process group on every rank (a no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def peak_memory_bytes(device: torch.device) -> int:
    """GPU max allocated on CUDA; this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
