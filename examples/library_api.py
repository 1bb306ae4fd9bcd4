"""qlora_dist as a library: its QLoRA pieces inside your own accelerate training loop.

    accelerate launch --config_file launch_configs/multi_gpu_ddp.yaml \
        examples/library_api.py examples/configs/tiny.yaml output.dir=outputs/library train.max_steps=5

The arguments are a run config and ``section.key=value`` overrides, exactly as for ``qlora-dist train``; any
launch config in launch_configs/ works (DDP, DeepSpeed ZeRO-2/3).
"""

import sys

import torch

from qlora_dist import QLoRAPlugin

plugin = QLoRAPlugin.from_yaml(sys.argv[1], sys.argv[2:])  # validated here, before anything heavy loads
# NCCL on GPUs, gloo on a CPU-only machine; raises if the launcher's world size is not the one formed.
accelerator = plugin.make_accelerator()
rank, world = accelerator.process_index, accelerator.num_processes

tokenizer = plugin.load_tokenizer()
# Data before weights: a bad row fails in seconds. One process per machine tokenizes; the others read its cache.
train_data, _eval_data = plugin.load_data(accelerator, tokenizer)
# The frozen NF4 base with LoRA on top: a whole replica on this rank's own device (never device_map="auto"),
# or this rank's shard of it under ZeRO-3.
model, tokenizer = plugin.load_model(accelerator, tokenizer)
model, optimizer = plugin.prepare(accelerator, model, plugin.make_optimizer(model))  # only LoRA params train
plugin.write_resolved_config(accelerator)

t, strategy = plugin.config.train, plugin.strategy  # the strategy follows the launch config: DDP or ZeRO-2/3
total_steps = t.max_steps or t.epochs * plugin.steps_per_epoch(len(train_data), world)
step, epoch = 0, 0
model.train()
while step < total_steps:
    # One list of grad_accum micro-batches per optimizer step: this rank's disjoint shard, reshuffled each epoch.
    for micro_batches in plugin.epoch_steps(train_data, epoch, rank, world, tokenizer.pad_token_id):
        for i, batch in enumerate(micro_batches):
            batch.pop("index")  # which examples these are (for the run report), not a model input
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # Gradients cross the network once per optimizer step, on its last micro-batch (DDP: no_sync before
            # that; DeepSpeed: the engine's accumulation boundary). accelerator.no_sync alone would make a
            # DeepSpeed engine step the optimizer on every micro-batch.
            with strategy.micro_step(model, sync=i == len(micro_batches) - 1):
                # Your own loss. (qlora-dist train instead normalises by the label tokens of the whole global
                # batch, so that W ranks x batch b step exactly like 1 rank x batch W*b.)
                # use_cache=False: packed batches (data.packing) are only recognised without a KV cache.
                loss = model(**batch, use_cache=False).loss / len(micro_batches)
                # accelerator.backward under DDP; under DeepSpeed the engine's, without its own 1/grad_accum.
                strategy.backward(accelerator, model, loss)
        # Clip to train.max_grad_norm, step, zero the gradients (DeepSpeed: engine.step does all three).
        strategy.step(accelerator, model, optimizer, t.max_grad_norm)
        step += 1
        if accelerator.is_main_process:
            print(f"step {step}/{total_steps}  loss {loss.item() * len(micro_batches):.4f} (rank 0's last micro-batch)")
        if step >= total_steps:
            break
    epoch += 1

# Saves adapter/ (rank 0), gathers checksums from every rank, merges into the dequantized base on rank 0, and
# writes run_report.json. check_batches: a few sequences on which rank 0 compares the merged model's logits with
# the QLoRA model's (merge.rel_logit_error in the report). Returns the report on rank 0, None on the others.
check = [torch.tensor([train_data[i]["input_ids"]]) for i in range(min(4, len(train_data)))]
report = plugin.finish(accelerator, model, tokenizer, stats={"steps": step}, check_batches=check)
if report is not None:
    print(f"world_size {report['world_size']}: report in {plugin.output_dir / 'run_report.json'}")
accelerator.end_training()
