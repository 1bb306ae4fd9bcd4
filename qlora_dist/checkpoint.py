"""Crash-safe checkpoints at optimizer-step boundaries, and exact resume from them.

A checkpoint is the folder ``output.dir/checkpoints/step-N/`` holding:

- ``adapter/``: the LoRA weights (peft format, safetensors), whole even under ZeRO-3;
- the optimizer state (``optimizer.pt`` for DDP; under ZeRO each rank's share as plain tensors, ``zero/rank-R.pt``),
  the LR scheduler state (``scheduler.pt``);
- ``rank-R.pt`` per rank: RNG states and the examples that rank consumed in the first epoch;
- ``state.json``: step, epoch, position in the epoch's order (examples consumed), world size, seed;
- ``config.yaml`` (the resolved run config) and ``manifest.json``: sha256 and size of every other file.

Every rank writes into ``checkpoints/.tmp-step-N`` on the same filesystem; rank 0 then fsyncs everything,
writes the manifest last, and renames the folder into place, so a checkpoint is either complete or absent.
Older checkpoints are pruned only after the new one is in place. (accelerate's ``save_state`` writes in
place and prunes first, which is why it is not used here.)

Nothing is deleted on doubt: a checkpoint that does not verify (a file missing, a checksum wrong, a file that
is not plain tensors) is moved aside to ``checkpoints/unusable/step-N`` with a ``REASON`` file, and when
checkpoints exist but none verifies the run stops and lists them (``output.overwrite=true`` starts over).
Only rank 0 decides (``choose``); the other ranks load the checkpoint it names.

The data order is a pure function of (seed, epoch), so a position in it is all a resume needs: no batch is
replayed. Nothing from a checkpoint is unpickled: the adapter is safetensors, everything torch loads uses
``weights_only=True`` (tensors and plain containers only), under DeepSpeed too (its own checkpoint files,
which it loads with ``weights_only=False``, are not used; see ``strategies/deepspeed.py``). The manifest
proves a file is the one that was written, not who wrote it; ``weights_only`` is what refuses a planted
pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fsutil import fsync_dir, fsync_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREEMPTED = "PREEMPTED"
DONE = "DONE"
UNUSABLE = "unusable"
REASON = "REASON"
# Files every checkpoint has, whatever the strategy (a manifest listing fewer does not verify).
REQUIRED = ("state.json", "adapter/adapter_model.safetensors", "scheduler.pt", "rank-0.pt")


@dataclass
class TrainState:
    """Where a run is: enough to continue it exactly."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch."""
    epoch_position: int = 0
    """Examples of this epoch's order consumed so far, over all ranks (a prefix of the order)."""
    world_size: int = 1
    total_steps: int = 0
    """The schedule's length, fixed at the first start so the LR schedule resumes unchanged."""
    seed: int = 0
    global_batch: int = 0
    """Examples per optimizer step over all ranks (the length-grouped order depends on it)."""
    initial_loss: float | None = None
    tokens: int = 0
    train_seconds: float = 0.0
    first_epoch_indices: list[int] = field(default_factory=list)
    """This rank's examples of the first epoch (per rank, kept in rank-R.pt)."""
    trackers: dict[str, str] = field(default_factory=dict)
    """Experiment-tracker run ids (W&B, MLflow), so a resumed run continues the same tracker run."""


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(
    root: Path,
    state: TrainState,
    *,
    accelerator,
    strategy,
    model,
    optimizer,
    scheduler,
    adapter_state: dict[str, torch.Tensor],
    config_yaml: str,
    keep: int,
) -> Path:
    """Write ``root/step-<state.step>`` atomically; every rank must call this. Returns the final path."""
    rank, main = accelerator.process_index, accelerator.is_main_process
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    unwrapped = accelerator.unwrap_model(model)
    if main:
        unwrapped.save_pretrained(tmp / "adapter", state_dict=adapter_state, safe_serialization=True)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        shared = {k: v for k, v in dataclasses.asdict(state).items() if k != "first_epoch_indices"}
        (tmp / "state.json").write_text(json.dumps(shared, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
    strategy.save_optimizer(tmp, model, optimizer, main)
    torch.save({"rng": _rng_state(), "first_epoch_indices": state.first_epoch_indices}, tmp / f"rank-{rank}.pt")
    accelerator.wait_for_everyone()

    if main:
        _write_manifest(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: kept, not overwritten
            move_aside(final, "replaced by a newer save of the same step")
        os.replace(tmp, final)
        fsync_dir(root)
        prune(root, keep)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftover temporary folders."""
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = sorted(_step_dirs(root), key=_step_of, reverse=True)
    for old in complete[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def step_dirs(root: Path) -> list[Path]:
    """The checkpoints in ``root``, newest first (not those moved aside)."""
    return sorted(_step_dirs(root), key=_step_of, reverse=True)


def find_resumable(root: Path, move_unusable: bool = False) -> Path | None:
    """The newest checkpoint that verifies; the unusable ones newer than it are reported (and, with
    ``move_unusable``, moved aside to ``root/unusable/``: only the one process that decides may do that)."""
    for path in step_dirs(root):
        problem = verify(path)
        if problem is None:
            return path
        where = move_aside(path, problem) if move_unusable else path
        log.warning("checkpoint %s is unusable (%s): trying the one before it%s", path, problem,
                    f"; kept as {where}" if move_unusable else "")  # fmt: skip
    return None


def choose(root: Path) -> Path | None:
    """Rank 0's resume decision: the newest checkpoint that verifies, or None when there are none at all.

    Raises a UserError listing them when checkpoints exist and none verifies: starting over would throw away
    the run's progress on what may be one flipped byte, so it takes ``output.overwrite=true``.
    """
    from .errors import UserError

    existing = step_dirs(root)
    if not existing:
        return None
    found = find_resumable(root, move_unusable=True)
    if found is None:
        names = ", ".join(p.name for p in existing)
        raise UserError(
            f"no checkpoint in {root} verifies ({names}: moved to {root / UNUSABLE}, each with a {REASON} file): "
            "nothing was deleted; set output.overwrite=true to start over, or restore a good copy there"
        )
    return found


def move_aside(path: Path, reason: str) -> Path:
    """Move checkpoint ``path`` to ``unusable/<name>`` beside it (never over an earlier one), with ``REASON``."""
    aside = path.parent / UNUSABLE
    aside.mkdir(exist_ok=True)
    target, n = aside / path.name, 1
    while target.exists():
        n += 1
        target = aside / f"{path.name}.{n}"
    os.replace(path, target)
    (target / REASON).write_text(reason + "\n")
    fsync_dir(aside)
    fsync_dir(path.parent)
    return target


def verify(path: Path) -> str | None:
    """None when the manifest lists every required file and each is present with its size and sha256, and
    every ``.pt`` file loads as plain tensors; else what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError):
        return "manifest is not valid JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"manifest does not list {missing[0]}"
    for name, entry in files.items():
        f = path / name
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            return f"manifest entry of {name} has no size and sha256"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"] or _sha256(f) != entry["sha256"]:
            return f"{name} does not match its checksum"
    for f in sorted(path.rglob("*.pt")):
        problem = _unsafe(f)
        if problem:
            return f"{f.relative_to(path)} {problem}"
    return None


def _unsafe(path: Path) -> str | None:
    """None when ``path`` loads with ``weights_only=True`` (tensors and plain containers, no code run)."""
    try:
        torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (not a zip), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"is not a plain tensor file (refused to unpickle it: {first[:160]})"
    return None


def read_state(path: Path) -> TrainState:
    """The run-wide part of a checkpoint's state (no per-rank data)."""
    return TrainState(**json.loads((Path(path) / "state.json").read_text()))


def load(path: Path, *, accelerator, strategy, model, optimizer, scheduler) -> TrainState:
    """Restore adapter, optimizer, scheduler, this rank's RNG and the position in the data from ``path``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = read_state(path)
    same_world = state.world_size == accelerator.num_processes
    unwrapped = accelerator.unwrap_model(model)
    adapter = load_file(path / "adapter" / "adapter_model.safetensors")
    strategy.load_adapter(unwrapped, adapter, set_peft_model_state_dict)
    strategy.load_optimizer(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_file = path / f"rank-{accelerator.process_index}.pt"
    if same_world:
        per_rank = torch.load(rank_file, weights_only=True)
        _set_rng_state(per_rank["rng"])
        state.first_epoch_indices = list(per_rank["first_epoch_indices"])
    else:
        # Per-rank RNG streams cannot be mapped onto a different number of ranks: start fresh ones that are
        # still a pure function of (seed, step, rank).
        torch.manual_seed(state.seed * 100_003 + state.step * 101 + accelerator.process_index)
        random.seed(state.seed + state.step + accelerator.process_index)
        state.first_epoch_indices = []
        if accelerator.is_main_process:
            log.warning(
                "resuming a %d-process run with %d processes: continuing from global sample position %d of "
                "epoch %d (step %d); data order unchanged, per-rank random streams restarted",
                state.world_size, accelerator.num_processes, state.epoch_position, state.epoch, state.step,
            )  # fmt: skip
    state.world_size = accelerator.num_processes
    if accelerator.is_main_process:
        log.info("resumed from %s: step %d, epoch %d, position %d", path, state.step, state.epoch, state.epoch_position)
    return state


def write_marker(output_dir: Path, name: str, info: dict[str, Any]) -> None:
    """``PREEMPTED`` or ``DONE`` in the output folder: what a requeue script decides from."""
    path = Path(output_dir) / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, path)


def clear_markers(output_dir: Path) -> None:
    for name in (PREEMPTED, DONE):
        (Path(output_dir) / name).unlink(missing_ok=True)


# -- helpers ---------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> list[Path]:
    return [p for p in Path(root).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]


def _step_of(path: Path) -> int:
    return int(path.name[5:])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        fsync_file(f)
        files[str(f.relative_to(folder))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1))
    fsync_file(manifest)
    for d in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        fsync_dir(d)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
