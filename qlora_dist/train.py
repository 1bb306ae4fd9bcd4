"""The training recipe behind ``qlora-dist train``: one loop, top to bottom.

Launch it once per process (``accelerate launch -m qlora_dist train RUN.yaml``) or as a single process
(``qlora-dist train RUN.yaml``); the code is the same. Every QLoRA piece comes from :class:`QLoRAPlugin`,
which is also what a user's own script calls.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from . import checkpoint, preemption
from .checkpoint import TrainState
from .config import RunConfig
from .data import collate
from .distributed import all_reduce_sum, peak_memory_bytes
from .loss import loss_path, real_token_count, target_count, token_loss_sum
from .plugin import QLoRAPlugin
from .preemption import StopSignal
from .progress import Progress
from .report import MetricsLog, plot_loss, process_seconds

log = logging.getLogger(__name__)


def train(config: RunConfig) -> dict[str, Any] | None:
    """Train, save the adapter, merge on rank 0. Returns the run report on the main process, else None.

    A run stopped by SIGTERM/SIGUSR1/SIGINT saves a checkpoint, leaves a ``PREEMPTED`` marker and returns
    None; the same command on the same output folder then continues where it stopped.
    """
    # Until the loop starts a signal ends the process at once (a launcher stopping us after a peer failed must
    # not wait); during the loop it means "checkpoint at the next step boundary" (see preemption.py).
    stop = StopSignal.install()
    plugin = QLoRAPlugin(config)
    t, strategy = plugin.config.train, plugin.strategy
    accelerator = plugin.make_accelerator()  # rank 0 holds the output folder's lock from here on
    rank, world = accelerator.process_index, accelerator.num_processes
    # Decided once, by rank 0, before anything heavy loads: a refused checkpoint set fails in seconds.
    resume_from = plugin.find_checkpoint(accelerator)

    # Data before weights: a bad row should fail in seconds, not after a multi-GB load.
    tokenizer = plugin.load_tokenizer()
    train_data, eval_data = plugin.load_data(accelerator, tokenizer)
    model, tokenizer = plugin.load_model(accelerator, tokenizer)
    pad_id = tokenizer.pad_token_id

    steps_per_epoch = plugin.steps_per_epoch(len(train_data), world)
    global_batch = t.micro_batch_size * t.grad_accum * world
    state = TrainState(
        world_size=world, seed=t.seed, global_batch=global_batch, total_steps=t.max_steps or t.epochs * steps_per_epoch
    )
    if resume_from is not None:  # the schedule keeps the length it had when the run first started
        state.total_steps = checkpoint.read_state(resume_from).total_steps
    optimizer = plugin.make_optimizer(model)
    scheduler = plugin.make_scheduler(optimizer, state.total_steps)
    model, optimizer = plugin.prepare(accelerator, model, optimizer)
    if resume_from is not None:
        state = plugin.resume(resume_from, accelerator, model, optimizer, scheduler)
    resumed_from_step = state.step if resume_from is not None else None
    plugin.write_resolved_config(accelerator, fresh=resume_from is None)
    plugin.start_trackers(accelerator, state)  # train.report_to; a resumed run continues its tracker runs

    metrics = MetricsLog(plugin.output_dir / "metrics.jsonl", accelerator.is_main_process, resume_step=state.step)
    metrics.sink = lambda row: plugin.log_metrics(accelerator, row)  # every row to the trackers, same step
    log.info(
        "training %d steps on %d process(es): %d examples, %d steps/epoch, global batch %d%s",
        state.total_steps, world, len(train_data), steps_per_epoch, global_batch,
        f", from step {state.step}" if state.step else "",
    )  # fmt: skip
    # A bar on a terminal; in a log file a line every train.progress_steps steps (no carriage-return redraws).
    progress = Progress(state.total_steps, state.step, accelerator.is_main_process, t.progress_steps)

    loss = eval_loss = None
    startup_seconds = process_seconds()  # process start to the first step: what the quantize-once cache cuts
    model.train()
    stop.enter(preemption.LOOP)
    start, seconds_before = time.perf_counter(), state.train_seconds
    launch_micro_batches = 0  # this launch's (data.balance_tokens may split a step finer than grad_accum)
    stopped_by_callback = False
    while not finished(state, t) and not stopped_by_callback:
        # A new order each epoch, a pure function of (seed, epoch); each example goes to exactly one rank. A
        # resumed run starts at its position in that order: nothing is replayed.
        for micro_batches in plugin.epoch_steps(
            train_data, state.epoch, rank, world, pad_id, start=state.epoch_position
        ):
            loss, step_tokens, stop_requested = train_step(
                model, micro_batches, accelerator, strategy, stop.requested, chunk_tokens=loss_chunk_tokens(t)
            )
            grad_norm = strategy.step(accelerator, model, optimizer, t.max_grad_norm)
            scheduler.step()
            state.step += 1
            launch_micro_batches += len(micro_batches)
            state.epoch_position += plugin.examples_in_step(train_data, state.epoch_position, world)
            state.initial_loss = loss if state.initial_loss is None else state.initial_loss
            state.tokens += step_tokens
            if state.epoch == 0:
                state.first_epoch_indices += [i for b in micro_batches for i in b["index"].tolist()]
            state.train_seconds = seconds_before + time.perf_counter() - start

            row = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": scheduler.get_last_lr()[0]}
            row.update(grad_norm=grad_norm, tokens_per_s=state.tokens / max(state.train_seconds, 1e-9))
            if eval_data is not None and t.eval_steps and state.step % t.eval_steps == 0 and not finished(state, t):
                row["eval_loss"] = evaluate(
                    model, eval_data, accelerator, t.micro_batch_size, pad_id, loss_chunk_tokens(t)
                )
            if state.step % t.log_steps == 0 or finished(state, t) or "eval_loss" in row:
                metrics.write({**row, "elapsed_s": round(state.train_seconds, 3)})
            progress.update(state.step, row, peak_memory_bytes(accelerator.device))
            stopped_by_callback = plugin.step_end_callbacks(accelerator, state.step, row)

            # Every rank saw the same (all-reduced) stop flag, so all stop at this same step boundary.
            if stop_requested:
                plugin.save_checkpoint(accelerator, model, optimizer, scheduler, state)
                plugin.mark_preempted(accelerator, state, stop.signal_name)
                # No rank exits before the marker is on disk: a launcher that kills the job when the first
                # node finishes must not take rank 0 down half-way through writing it.
                accelerator.wait_for_everyone()
                progress.close()
                plugin.finish_trackers(accelerator)
                return None
            if t.save_steps and state.step % t.save_steps == 0 and not finished(state, t):
                plugin.save_checkpoint(accelerator, model, optimizer, scheduler, state)
            if finished(state, t) or stopped_by_callback:
                break
        else:  # the epoch ran out: the next one starts at the beginning of its own order
            state.epoch, state.epoch_position = state.epoch + 1, 0
    progress.close()
    stop.enter(preemption.END)  # every file from here on is written whole or not at all: exit promptly
    plugin.save_checkpoint(accelerator, model, optimizer, scheduler, state)

    if eval_data is not None:
        eval_loss = evaluate(model, eval_data, accelerator, t.micro_batch_size, pad_id, loss_chunk_tokens(t))
        metrics.write({"step": state.step, "eval_loss": eval_loss})
    launch_steps = state.step - (resumed_from_step or 0)
    stats = {
        "steps": state.step,
        "epochs": round(state.epoch + state.epoch_position / len(train_data), 4),
        "stopped_by_callback": stopped_by_callback,
        "num_examples": len(train_data),
        "indices_first_epoch": state.first_epoch_indices,
        "initial_loss": state.initial_loss,
        "final_loss": loss,
        "eval_loss": eval_loss,
        "tokens": state.tokens,
        "tokens_per_s": state.tokens / state.train_seconds if state.train_seconds > 0 else None,
        "train_seconds": round(state.train_seconds, 3),
        "resumed_from_step": resumed_from_step,
        "startup_seconds": startup_seconds,
        "micro_batches_per_step": round(launch_micro_batches / launch_steps, 3) if launch_steps else None,
        "loss": loss_path(model),  # "chunked", or "full logits: <why>" (qlora_dist.loss)
    }
    if accelerator.is_main_process:
        plot_loss(metrics.rows, plugin.output_dir / "loss.png")
    report = plugin.finish(accelerator, model, tokenizer, stats, check_batches=merge_check_batches(train_data))
    accelerator.end_training()
    return report


def loss_chunk_tokens(t) -> int | None:
    """The loss's chunk size from the config: None for the model's full logits."""
    return t.loss_chunk_tokens if t.chunked_loss else None


def finished(state: TrainState, t) -> bool:
    """``max_steps`` optimizer steps done, or else ``epochs`` whole epochs."""
    return state.step >= t.max_steps if t.max_steps else state.epoch >= t.epochs


def loss_scale(micro_batches: list[dict[str, torch.Tensor]], accelerator) -> tuple[float, float]:
    """(factor for each micro-batch's summed token loss, label tokens of the whole global batch).

    The step's loss normalisation, in one place: the summed loss of every micro-batch is divided by the label
    tokens of the whole global batch (every rank, every micro-batch; one small all-reduce) and multiplied by the
    world size, because DDP and DeepSpeed average gradients over ranks. The gradient is then the same whatever
    the split: 2 ranks x micro-batch b gives what 1 rank x 2b gives. Call it on every rank, once per step.
    """
    local_targets = sum(target_count(b) for b in micro_batches)
    (global_targets,) = all_reduce_sum([local_targets], accelerator.device)
    return accelerator.num_processes / max(global_targets, 1.0), global_targets


def train_step(
    model, micro_batches: list[dict[str, torch.Tensor]], accelerator, strategy, stop: bool = False, chunk_tokens=0
):
    """Forward and backward over one optimizer step's micro-batches.

    Returns (global mean loss, real tokens over all ranks, whether any rank asked to stop): the stop flag
    rides on the loss all-reduce, so agreeing to stop costs no extra collective.

    The loss is normalised by :func:`loss_scale`: by the label tokens of the whole global batch, times the
    world size. ``chunk_tokens`` is :func:`qlora_dist.loss.token_loss_sum`'s (None: full
    logits).
    """
    scale, global_targets = loss_scale(micro_batches, accelerator)
    loss_sum, real_tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "index"}
        real_tokens += real_token_count(batch)
        # Gradients cross the network once per optimizer step, on its last micro-batch.
        with strategy.micro_step(model, sync=i == len(micro_batches) - 1):
            summed = token_loss_sum(model, batch, chunk_tokens)
            strategy.backward(accelerator, model, summed * scale)
        loss_sum += float(summed.detach())
    total_loss, total_real, stops = all_reduce_sum([loss_sum, real_tokens, float(stop)], accelerator.device)
    return total_loss / max(global_targets, 1.0), int(total_real), stops > 0


@torch.no_grad()
def evaluate(model, dataset, accelerator, batch_size: int, pad_id: int, chunk_tokens: int | None = 0) -> float:
    """Token-mean loss over the eval set, each rank taking every world-th example; one all-reduce at the end."""
    net = accelerator.unwrap_model(model)  # no DDP forward: nothing to synchronise in eval
    net.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(dataset), world))
    # Every rank runs the same number of forwards: under ZeRO-3 each forward gathers weights collectively.
    # A rank with no examples left repeats example 0 and counts nothing.
    batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    loss_sum, targets = 0.0, 0
    for b in range(batches):
        chunk = indices[b * batch_size : (b + 1) * batch_size]
        batch = collate([dataset[i] for i in (chunk or [0])], pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        summed = float(token_loss_sum(net, batch, chunk_tokens))
        if chunk:
            loss_sum += summed
            targets += target_count(batch)
    net.train()
    total_loss, total_targets = all_reduce_sum([loss_sum, targets], accelerator.device)
    return total_loss / max(total_targets, 1.0)


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine, linear or constant (``plugin.make_scheduler`` reads these from the config)."""
    from transformers import get_scheduler

    kind = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def merge_check_batches(dataset, count: int = 4) -> list[torch.Tensor]:
    """A few training sequences (one per batch, unpadded) to compare the merged model with the QLoRA one."""
    return [torch.tensor([dataset[i]["input_ids"]]) for i in range(min(count, len(dataset)))]
