"""The training recipe behind ``qlora-dist train``: one loop, top to bottom.

Launch it once per process (``accelerate launch -m qlora_dist train RUN.yaml``) or as a single process
(``qlora-dist train RUN.yaml``); the code is the same. Every QLoRA piece comes from :class:`QLoRAPlugin`,
which is also what a user's own script calls.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import RunConfig
from .data import collate
from .distributed import all_reduce_sum
from .plugin import QLoRAPlugin
from .report import MetricsLog, plot_loss

log = logging.getLogger(__name__)


def train(config: RunConfig) -> dict[str, Any] | None:
    """Train, save the adapter, merge on rank 0. Returns the run report on the main process, else None."""
    plugin = QLoRAPlugin(config)
    t, strategy = plugin.config.train, plugin.strategy
    accelerator = plugin.make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes

    # Data before weights: a bad row should fail in seconds, not after a multi-GB load.
    tokenizer = plugin.load_tokenizer()
    train_data, eval_data = plugin.load_data(accelerator, tokenizer)
    model, tokenizer = plugin.load_model(accelerator, tokenizer)
    pad_id = tokenizer.pad_token_id

    steps_per_epoch = plugin.steps_per_epoch(len(train_data), world)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    optimizer = plugin.make_optimizer(model)
    scheduler = make_scheduler(optimizer, t.lr_scheduler, math.ceil(t.warmup_ratio * total_steps), total_steps)
    model, optimizer = plugin.prepare(accelerator, model, optimizer)
    plugin.write_resolved_config(accelerator)

    metrics = MetricsLog(plugin.output_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    log.info(
        "training %d steps on %d process(es): %d examples, %d steps/epoch, global batch %d",
        total_steps, world, len(train_data), steps_per_epoch, t.micro_batch_size * t.grad_accum * world,
    )  # fmt: skip
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)

    step, real_tokens, first_epoch_indices = 0, 0, []
    initial_loss = loss = eval_loss = None
    model.train()
    start = time.perf_counter()
    for epoch in itertools.count():
        # A new order each epoch, a pure function of (seed, epoch); each example goes to exactly one rank.
        for micro_batches in plugin.epoch_steps(train_data, epoch, rank, world, pad_id):
            if step >= total_steps:
                break
            loss, step_tokens = train_step(model, micro_batches, accelerator, strategy)
            grad_norm = strategy.step(accelerator, model, optimizer, t.max_grad_norm)
            scheduler.step()
            step += 1

            initial_loss = loss if initial_loss is None else initial_loss
            real_tokens += step_tokens
            if epoch == 0:
                first_epoch_indices += [i for b in micro_batches for i in b["index"].tolist()]
            elapsed = time.perf_counter() - start
            row = {"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            row["tokens_per_s"] = real_tokens / elapsed
            if eval_data is not None and t.eval_steps and step % t.eval_steps == 0 and step < total_steps:
                row["eval_loss"] = evaluate(model, eval_data, accelerator, t.micro_batch_size, pad_id)
            if step % t.log_steps == 0 or step == total_steps or "eval_loss" in row:
                metrics.write({**row, "elapsed_s": round(elapsed, 3)})
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            progress.update(1)
        if step >= total_steps:
            break
    train_seconds = time.perf_counter() - start
    progress.close()

    if eval_data is not None:
        eval_loss = evaluate(model, eval_data, accelerator, t.micro_batch_size, pad_id)
        metrics.write({"step": step, "eval_loss": eval_loss})
    stats = {
        "steps": step,
        "epochs_started": epoch + 1,
        "num_examples": len(train_data),
        "examples_first_epoch": len(first_epoch_indices),
        "indices_first_epoch": first_epoch_indices,
        "initial_loss": initial_loss,
        "final_loss": loss,
        "eval_loss": eval_loss,
        "tokens": real_tokens,
        "tokens_per_s": real_tokens / train_seconds if train_seconds > 0 else None,
        "train_seconds": round(train_seconds, 3),
    }
    if accelerator.is_main_process:
        plot_loss(metrics.rows, plugin.output_dir / "loss.png")
    report = plugin.finish(accelerator, model, tokenizer, stats, check_batches=merge_check_batches(train_data))
    accelerator.end_training()
    return report


def train_step(model, micro_batches: list[dict[str, torch.Tensor]], accelerator, strategy) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (global mean loss, real tokens).

    The loss is normalised by the label tokens of the whole global batch (every rank, every micro-batch), and
    multiplied by the world size because DDP and DeepSpeed average gradients over ranks. The gradient is then
    the same whatever the split: 2 ranks x micro-batch b gives what 1 rank x 2b gives.
    """
    local_targets = sum(target_count(b) for b in micro_batches)
    (global_targets,) = all_reduce_sum([local_targets], accelerator.device)
    scale = accelerator.num_processes / max(global_targets, 1.0)
    loss_sum, real_tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "index"}
        real_tokens += real_token_count(batch)
        # Gradients cross the network once per optimizer step, on its last micro-batch.
        with strategy.micro_step(model, sync=i == len(micro_batches) - 1):
            summed = token_loss_sum(model, batch)
            strategy.backward(accelerator, model, summed * scale)
        loss_sum += float(summed.detach())
    total_loss, total_real = all_reduce_sum([loss_sum, real_tokens], accelerator.device)
    return total_loss / max(global_targets, 1.0), int(total_real)


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled tokens of ``batch`` (labels -100 are ignored)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten().to(logits.device), ignore_index=-100, reduction="sum"
    )


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss (labels shifted by one, -100 ignored)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def real_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch (what tokens/s counts)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["real_tokens"].sum()) if "real_tokens" in batch else int(batch["input_ids"].numel())


@torch.no_grad()
def evaluate(model, dataset, accelerator, batch_size: int, pad_id: int) -> float:
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
        summed = float(token_loss_sum(net, batch))
        if chunk:
            loss_sum += summed
            targets += target_count(batch)
    net.train()
    total_loss, total_targets = all_reduce_sum([loss_sum, targets], accelerator.device)
    return total_loss / max(total_targets, 1.0)


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine, linear or constant."""
    from transformers import get_scheduler

    kind = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def merge_check_batches(dataset, count: int = 4) -> list[torch.Tensor]:
    """A few training sequences (one per batch, unpadded) to compare the merged model with the QLoRA one."""
    return [torch.tensor([dataset[i]["input_ids"]]) for i in range(min(count, len(dataset)))]
