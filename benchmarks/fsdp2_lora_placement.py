"""FSDP2 with a 4-bit base: LoRA replicated (only the frozen base sharded) against LoRA sharded too, measured.

::

    python benchmarks/fsdp2_lora_placement.py                 # 2 CPU processes over gloo, a small Llama
    python benchmarks/fsdp2_lora_placement.py --device cuda --processes 8 --hidden 2048 --layers 16

One invocation launches ``--processes`` workers (``torch.distributed.run``). Each builds the same NF4 + LoRA
model, shards it with qlora_dist's own :func:`qlora_dist.strategies.fsdp2.shard_model` both ways, and trains
the same batches with plain AdamW (the one optimizer both placements can run), alternating the placements
``--repeats`` times so neither always runs first. Printed per placement: median seconds per step, bytes
gathered per step, the LoRA + optimizer bytes each rank holds, and the largest difference between the two
placements' LoRA weights after training (they compute the same thing; only summation order differs). The
ratio ``sharded / replicated`` is the figure the strategy's choice rests on (see BENCHMARKS.md).

``shard_lora`` is not a setting of a run: sharded LoRA turns the adapter into DTensors, which bitsandbytes'
optimizers cannot step and whose optimizer must be built after sharding; it exists here to be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="rows per process per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per repeat (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the model folder, inside a launched worker
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    from transformers import AutoTokenizer

    from qlora_dist.tiny import build_tiny_model, demo_texts, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(demo_texts(REPO / "examples" / "data"), tmp / "tok")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tok")
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        import torch

        build_tiny_model(tmp / "model", tokenizer, hidden_size=args.hidden, layers=args.layers,
                         dtype=getattr(torch, dtype), device=args.device)  # fmt: skip
        out = tmp / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
               __file__, "--worker", str(tmp / "model"), "--json", str(out)]  # fmt: skip
        for flag in ("device", "hidden", "layers", "seq", "batch", "steps", "repeats"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(cmd, check=True, env=env)
        result = json.loads(out.read_text())
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from qlora_dist import model as model_mod
    from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
    from qlora_dist.strategies.fsdp2 import FSDP2CommCounter, FSDP2Strategy, shard_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Before from_pretrained: transformers starts torch.distributed itself when it sees RANK/WORLD_SIZE.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.worker).vocab_size
    gen = torch.Generator().manual_seed(1234 + rank)
    batches = [torch.randint(3, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.steps + 1)]

    def run(shard_lora: bool) -> dict:
        base = model_mod.load_quantized_model(
            ModelConfig(name_or_path=args.worker), QuantConfig(storage_dtype="uint8"), device, compute,
            device_map={"": device},
        )  # fmt: skip
        model_mod.enable_gradient_checkpointing(base)
        torch.manual_seed(0)
        model = model_mod.attach_lora(base, LoraConfig(r=16, alpha=32, dropout=0.0))
        counter = FSDP2CommCounter()
        shard_model(model, device, world, counter=counter, shard_lora=shard_lora)
        lora = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=1e-3)  # after sharding: the sharded placement's params are new
        strategy = FSDP2Strategy(world_size=world, counter=counter)
        strategy._lora = lora
        times = []
        for i, ids in enumerate(batches):
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            with counter.phase():
                model(input_ids=ids.to(device), labels=ids.to(device)).loss.backward()
            if shard_lora:  # FSDP reduce-scattered the gradients in backward; clip over DTensors
                torch.nn.utils.clip_grad_norm_(lora, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                strategy.step(None, model, optimizer, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step warms up
                times.append(time.perf_counter() - start)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in lora]
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        state = [t.to_local() if hasattr(t, "to_local") else t for t in state]
        weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
                   for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
        return {
            "step_s": statistics.median(times),
            "param_gather_bytes_per_step": counter.param_gather // len(batches),
            "grad_sync_bytes_per_step": counter.grad_sync // len(batches),
            "lora_and_optimizer_bytes_per_rank": sum(t.numel() * t.element_size() for t in local + state),
            "weights": weights,
        }

    results: dict[str, list[dict]] = {"replicated": [], "sharded": []}
    for r in range(args.repeats):
        order = ("replicated", "sharded") if r % 2 == 0 else ("sharded", "replicated")
        for name in order:
            results[name].append(run(name == "sharded"))
    a, b = results["replicated"][-1]["weights"], results["sharded"][-1]["weights"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    summary = {
        name: {
            "step_s": statistics.median(r["step_s"] for r in runs),
            **{k: runs[-1][k] for k in runs[-1] if k not in ("step_s", "weights")},
        }
        for name, runs in results.items()
    }
    summary["sharded_over_replicated_step_time"] = summary["sharded"]["step_s"] / summary["replicated"]["step_s"]
    summary["max_lora_difference"] = diff
    summary["setup"] = {k: getattr(args, k) for k in ("device", "hidden", "layers", "seq", "batch", "steps", "repeats")}
    summary["setup"]["processes"] = world
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps(summary))
    dist.destroy_process_group()
    return 0


def format_table(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"FSDP2, NF4 base: {s['processes']} x {s['device']}, hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['batch']} x {s['seq']} tokens per process, {s['steps']} steps x {s['repeats']} repeats, AdamW",
        "",
        "| LoRA placement | s/step (median) | gathered bytes/step | LoRA all-reduce bytes/step | LoRA + optimizer bytes/rank |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("replicated", "sharded"):
        r = result[name]
        # Sharded LoRA's gradients are reduce-scattered by FSDP inside backward, not counted here.
        sync = f"{r['grad_sync_bytes_per_step']:,}" if name == "replicated" else "(reduce-scatter in backward)"
        lines.append(
            f"| {name} | {r['step_s']:.4f} | {r['param_gather_bytes_per_step']:,} | "
            f"{sync} | {r['lora_and_optimizer_bytes_per_rank']:,} |"
        )
    lines += [
        "",
        f"sharded / replicated step time: {result['sharded_over_replicated_step_time']:.3f}; "
        f"largest LoRA difference between the two: {result['max_lora_difference']:.2e}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
