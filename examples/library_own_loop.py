"""qlora_dist as a library, with your own training loop and your own loss, checkpoints and resume.

    accelerate launch --config_file launch_configs/multi_gpu_ddp.yaml examples/library_own_loop.py \
        examples/configs/tiny.yaml output.dir=outputs/own-loop train.max_steps=20 --steps-per-launch 10

``--steps-per-launch N`` stops after N optimizer steps with a checkpoint, as a job cut into chunks by a time
limit would; the same command then continues from the newest checkpoint in ``output.dir`` (the same examples
in the same order, the same LR schedule, the same tracker runs) until ``train.max_steps``, then merges and
writes ``run_report.json``. Without it the run goes to the end in one launch.

The loss is this script's own: token cross-entropy with label smoothing. Only its normalisation comes from
qlora_dist (``plugin.loss_scale``), so that 2 ranks x micro-batch b train exactly like 1 rank x 2b.
"""

import argparse

import torch
import torch.nn.functional as F

from qlora_dist import QLoRAPlugin
from qlora_dist.checkpoint import TrainState
from qlora_dist.report import MetricsLog

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("config", help="run config YAML")
parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=20")
parser.add_argument("--steps-per-launch", type=int, default=0, help="stop after this many steps (0: run to the end)")
parser.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy (default 0.1)")
args = parser.parse_args()

plugin = QLoRAPlugin.from_yaml(args.config, args.overrides)
accelerator = plugin.make_accelerator()
rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
t, strategy = plugin.config.train, plugin.strategy

tokenizer = plugin.load_tokenizer()
train_data, eval_data = plugin.load_data(accelerator, tokenizer)
model, tokenizer = plugin.load_model(accelerator, tokenizer)
pad_id = tokenizer.pad_token_id

total_steps = t.max_steps or t.epochs * plugin.steps_per_epoch(len(train_data), world)
optimizer = plugin.make_optimizer(model)
scheduler = plugin.make_scheduler(optimizer, total_steps)  # train.lr_scheduler + train.warmup_ratio
model, optimizer = plugin.prepare(accelerator, model, optimizer)

# Where the run is. A checkpoint restores it: adapter, optimizer, scheduler, RNG, position in the data order.
state = TrainState(world_size=world, seed=t.seed, global_batch=t.micro_batch_size * t.grad_accum * world)
state.total_steps = total_steps
resume_from = plugin.find_checkpoint()  # None on a fresh start
if resume_from is not None:
    state = plugin.resume(resume_from, accelerator, model, optimizer, scheduler)
resumed_from_step = state.step if resume_from is not None else None
plugin.write_resolved_config(accelerator, fresh=resume_from is None)
plugin.start_trackers(accelerator, state)  # train.report_to; a resumed run continues the same tracker runs
metrics = MetricsLog(plugin.output_dir / "metrics.jsonl", accelerator.is_main_process, resume_step=state.step)
metrics.sink = lambda row: plugin.log_metrics(accelerator, row)


def my_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label-smoothed next-token cross-entropy, *summed* over the labelled tokens (normalised by the caller)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=-100,
        reduction="sum",
        label_smoothing=args.label_smoothing,
    )


steps_this_launch = 0
model.train()
while state.step < total_steps:
    # This rank's batches from the run's position in the epoch's order: a resumed run replays nothing.
    for micro_batches in plugin.epoch_steps(train_data, state.epoch, rank, world, pad_id, start=state.epoch_position):
        scale, targets = plugin.loss_scale(accelerator, micro_batches)  # one small all-reduce per step
        loss_sum = 0.0
        for i, batch in enumerate(micro_batches):
            index = batch.pop("index")  # which examples these are: not a model input
            if state.epoch == 0:
                state.first_epoch_indices += index.tolist()
            batch = {k: v.to(device) for k, v in batch.items()}
            with strategy.micro_step(model, sync=i == len(micro_batches) - 1):
                summed = my_loss_sum(model, batch)
                strategy.backward(accelerator, model, summed * scale)
            loss_sum += float(summed.detach())
        grad_norm = strategy.step(accelerator, model, optimizer, t.max_grad_norm)
        scheduler.step()
        state.step += 1
        steps_this_launch += 1
        state.epoch_position += plugin.examples_in_step(train_data, state.epoch_position, world)  # all ranks
        # Rank 0's share of the loss, per label token of the global batch (x world for the whole batch's mean).
        row = {"step": state.step, "loss": loss_sum * world / max(targets, 1.0), "lr": scheduler.get_last_lr()[0]}
        metrics.write({**row, "grad_norm": grad_norm})
        if accelerator.is_main_process:
            print(f"step {state.step}/{total_steps}  loss {row['loss']:.4f}", flush=True)
        if state.step >= total_steps:
            break
        if (t.save_steps and state.step % t.save_steps == 0) or steps_this_launch == args.steps_per_launch:
            plugin.save_checkpoint(accelerator, model, optimizer, scheduler, state)
        if steps_this_launch == args.steps_per_launch:
            plugin.finish_trackers(accelerator)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                print(f"stopped at step {state.step}: run the same command to continue", flush=True)
            raise SystemExit(0)
    else:
        state.epoch, state.epoch_position = state.epoch + 1, 0

plugin.save_checkpoint(accelerator, model, optimizer, scheduler, state)
if eval_data is not None:
    metrics.write({"step": state.step, "eval_loss": plugin.evaluate(accelerator, model, eval_data, pad_id)})
check = [torch.tensor([train_data[i]["input_ids"]]) for i in range(min(4, len(train_data)))]
stats = {"steps": state.step, "num_examples": len(train_data), "indices_first_epoch": state.first_epoch_indices}
stats["resumed_from_step"] = resumed_from_step
report = plugin.finish(accelerator, model, tokenizer, stats=stats, check_batches=check)
if report is not None:
    print(f"world_size {report['world_size']}: report in {plugin.output_dir / 'run_report.json'}", flush=True)
accelerator.end_training()
