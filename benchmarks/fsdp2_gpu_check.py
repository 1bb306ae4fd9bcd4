"""The FSDP2 GPU check (``make bench-gpu`` runs it after the single-GPU check): written, not yet run on a GPU.

On every GPU of the machine (``--processes``, default: all), in one invocation:

1. a real run: ``accelerate launch --config_file launch_configs/fsdp2.yaml -m qlora_dist train`` on a
   Llama-shaped model with random bfloat16 weights (``--hidden``, ``--layers``), the demo alpaca data, bfloat16
   compute, the default paged 8-bit AdamW, merge on. Printed: the strategy and world size the workers saw,
   the base bytes each rank held against the whole base, peak CUDA memory per rank against the planner's
   ``peak_allocated_bytes`` and ``load_peak`` for the same config, gathered bytes per step, the merge's
   relative logit error, and the time per step;
2. the LoRA placement benchmark (``benchmarks/fsdp2_lora_placement.py --device cuda``) on the same GPUs.

What it checks that the CPU tests cannot: NCCL collectives, CUDA bitsandbytes kernels under ``fully_shard``,
accelerate's FSDP state on CUDA (the model still never goes through ``accelerator.prepare``), the CUDA memory
the planner predicts. With one GPU the world is one: the code path runs but nothing is really split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=max(torch.cuda.device_count(), 1))
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fsdp2 GPU check: no CUDA device here; nothing run")
        return 0
    from transformers import AutoTokenizer

    from qlora_dist.config import load_config
    from qlora_dist.plan import plan_memory, read_launch_config
    from qlora_dist.tiny import build_tiny_model, demo_texts, train_tokenizer

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result: dict = {"processes": args.processes, "hidden": args.hidden, "layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(demo_texts(REPO / "examples" / "data"), tmp / "tok")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tok")
        build_tiny_model(tmp / "model", tokenizer, hidden_size=args.hidden, layers=args.layers,
                         dtype=torch.bfloat16, device="cuda", num_attention_heads=16, num_key_value_heads=4)  # fmt: skip
        cfg = tmp / "run.yaml"
        cfg.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(tmp / "model")},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"path": str(REPO / "examples" / "data" / "alpaca_demo.jsonl"), "format": "alpaca",
                     "max_length": 512},
            "train": {"max_steps": args.steps, "micro_batch_size": 4, "save_steps": 0},
            "output": {"dir": str(tmp / "out")},
        }))  # fmt: skip
        launch = REPO / "launch_configs" / "fsdp2.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
               "--num_processes", str(args.processes), "-m", "qlora_dist", "train", str(cfg)]  # fmt: skip
        try:
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            report = json.loads((tmp / "out" / "run_report.json").read_text())
            plan = plan_memory(load_config(cfg), read_launch_config(launch), args.processes, 80 * 2**30, "cuda")
            result["run"] = {
                k: report.get(k)
                for k in ("world_size", "strategy", "distributed_type", "optimizer", "base_bytes_per_rank",
                          "peak_memory_bytes", "param_gather_bytes_per_step", "grad_sync_bytes_per_step",
                          "initial_loss", "final_loss", "train_seconds", "steps")
            }  # fmt: skip
            result["run"]["merge_rel_logit_error"] = (report.get("merge") or {}).get("rel_logit_error")
            result["run"]["base_checksums_equal"] = report["base_checksum_after"] == (
                [report["base_checksum_before"]] * report["world_size"]
            )
            result["plan"] = {
                "peak_allocated_bytes": plan.peak_allocated_bytes,
                "load_peak_bytes": plan.per_gpu_bytes["load_peak"],
                "peak_measured_over_planned": max(report["peak_memory_bytes"]) / plan.peak_allocated_bytes,
            }
        except Exception as e:  # report and go on: one borrowed-GPU run should say as much as it can
            result["run"] = {"error": f"{type(e).__name__}: {e}"}
        bench = tmp / "placement.json"
        try:
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "fsdp2_lora_placement.py"), "--device", "cuda",
                            "--processes", str(args.processes), "--hidden", str(args.hidden), "--layers",
                            str(min(args.layers, 8)), "--seq", "512", "--json", str(bench)],
                           check=True, env=env, cwd=REPO)  # fmt: skip
            result["placement"] = json.loads(bench.read_text())
        except Exception as e:
            result["placement"] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
