"""``qlora-dist demo``: the embedded default, end to end and offline.

Builds (once, cached) a tiny Llama-architecture model and a tokenizer trained on the bundled
``examples/data`` set, launches 2 processes through ``accelerate launch`` (GPUs when there are two, else the
CPU over gloo), trains, merges on rank 0, and prints what happened.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from .errors import UserError

ASSETS_VERSION = "v1"
# The embedded default run config. Small enough for a 2-core CPU in well under 3 minutes.
DEMO_CONFIG = {
    "model": {"name_or_path": "<built>"},
    "quant": {"compute_dtype": "auto"},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "data": {"path": "<bundled>", "format": "alpaca", "max_length": 96, "eval_fraction": 0.05},
    "train": {
        "epochs": 4,
        "micro_batch_size": 8,
        "grad_accum": 1,
        "lr": 3e-3,
        "warmup_ratio": 0.05,
        "seed": 42,
        "eval_steps": 20,
        "log_steps": 1,
    },
    "output": {"dir": "<output>", "merge": True, "overwrite": True},
}
DEMO_PROMPT = "What is the capital of France?"


def find_demo_data() -> Path:
    """The bundled alpaca demo set (``examples/data/alpaca_demo.jsonl`` of a checkout)."""
    from .tiny import DEFAULT_DATA_DIR

    path = DEFAULT_DATA_DIR / "alpaca_demo.jsonl"
    if not path.is_file():
        raise UserError(f"demo data not found at {path}: run the demo from a qlora-dist checkout (make demo)")
    return path


def ensure_assets(cache_root: Path) -> Path:
    """The tiny demo model folder (tokenizer, random init, short pretraining), built once and then reused."""
    from .tiny import build_tiny_model, demo_texts, plain_texts, pretrain_tiny_model, train_tokenizer

    folder = cache_root / f"demo-model-{ASSETS_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer = train_tokenizer(demo_texts(), tmp, vocab_size=1024)
    build_tiny_model(tmp, tokenizer, arch="llama", hidden_size=128, layers=2, seed=0)
    # A base model knows its language before anyone fine-tunes it: a few seconds of full training on the
    # plain facts make this one a (tiny) pretrained base. The instruction format is left for the adapter.
    pretrain_tiny_model(tmp, plain_texts(), steps=300)
    os.replace(tmp, folder)
    return folder


def launch_command(num_processes: int, port: int) -> list[str]:
    """``accelerate launch`` arguments for DDP on this machine (the same flags as launch_configs/multi_gpu_ddp.yaml).

    On a machine without a GPU, qlora_dist itself turns ``--multi_gpu`` into CPU processes over gloo.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--num_processes", str(num_processes), "--main_process_port", str(port)]
    if num_processes > 1:
        cmd.append("--multi_gpu")
    return cmd


def run_demo(output: Path, num_processes: int | None, overrides: list[str]) -> int:
    """Build, launch, train, merge, summarise. Returns the launcher's exit status."""
    import torch

    from .plugin import default_cache_dir

    gpus = torch.cuda.device_count()
    n = num_processes or 2
    if 0 < gpus < n:
        print(f"qlora-dist demo: {gpus} GPU(s) visible, so {gpus} process(es) instead of {n}", flush=True)
        n = gpus
    data = find_demo_data()
    print(f"qlora-dist demo: building the tiny model (cached in {default_cache_dir()}) ...", flush=True)
    model_dir = ensure_assets(default_cache_dir())
    config = json.loads(json.dumps(DEMO_CONFIG))
    config["model"]["name_or_path"] = str(model_dir)
    config["data"]["path"] = str(data)
    config["output"]["dir"] = str(output)
    output.mkdir(parents=True, exist_ok=True)
    config_path = output / "demo_run.yaml"  # the run config the demo launches with (config.yaml: resolved)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    where = f"{n} GPU process(es)" if gpus else f"{n} CPU processes (gloo)"
    print(f"qlora-dist demo: launching {where} with accelerate ...", flush=True)
    cmd = launch_command(n, free_port()) + ["-m", "qlora_dist", "train", str(config_path), *overrides]
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"qlora-dist demo: training failed (exit {rc})", file=sys.stderr)
        return rc
    print_summary(output, model_dir)
    return 0


def _quantized(report: dict) -> str:
    """The measured share of the base held in 4-bit (``quant/coverage.py``)."""
    q = report.get("quantization") or {}
    if report.get("quantized_fraction") is None:
        return "not measured"
    return (
        f"{report['quantized_fraction']:.1%} of the decoder weights in NF4 (measured on the loaded model; "
        f"{q.get('params_fraction') or 0:.1%} of all parameters, embeddings and head stay {report['compute_dtype']})"
    )


def _comm_time(report: dict) -> list[str]:
    """The summary line on time in the all-reduce, or none where it was not measured (CUDA)."""
    comm = [c for c in report.get("comm_seconds_per_step") or [] if c is not None]
    steps, seconds = report.get("steps"), report.get("train_seconds")
    if not comm or not steps or not seconds:
        return []
    worst = max(comm)
    return [
        f"all-reduce         in flight {worst * 1000:.0f} ms per step, {worst / (seconds / steps):.0%} of a step "
        "(waiting for the slower rank included)"
    ]


def print_summary(output: Path, model_dir: Path) -> None:
    """Loss, synced bytes, merge error, where things are, and the merged model's answer to a training prompt."""
    report = json.loads((output / "run_report.json").read_text())
    merge = report.get("merge") or {}
    answer = generate(output / "merged", DEMO_PROMPT) if merge else None
    sync, full = report["grad_sync_bytes_per_step"], report["full_grad_bytes"]
    lines = [
        "",
        "== qlora-dist demo ==",
        f"processes          {report['world_size']} x {report['device']} ({report['distributed_type']})",
        f"4-bit base         {_quantized(report)}",
        f"loss               {report['initial_loss']:.3f} -> {report['final_loss']:.3f} (eval {report['eval_loss']:.3f})",
        f"synced per step    {_mb(sync)} of LoRA gradients; a full fine-tune would sync {_mb(full)} "
        f"({full / max(sync, 1):.0f}x more)",
        *_comm_time(report),
        f"base unchanged     {all(c == report['base_checksum_before'] for c in report['base_checksum_after'])}"
        f" on every rank; LoRA identical on every rank: {len(set(report['lora_checksum_per_rank'])) == 1}",
    ]
    if merge:
        lines.append(
            f"merge (rank 0)     {merge['base']} base, {merge['dtype']}, relative logit error {merge['rel_logit_error']:.2e}"
        )
    lines += [
        f"outputs            {output}/ (adapter/, merged/, run_report.json, metrics.jsonl, loss.png)",
        f"base model         {model_dir}",
    ]
    if answer is not None:
        lines += [f"prompt             {DEMO_PROMPT}", f"merged model says  {answer}"]
    print("\n".join(lines))


def generate(model_dir: Path, instruction: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a saved (merged) model to an alpaca-style instruction, loaded with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import alpaca_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(alpaca_prompt(instruction, ""), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def free_port() -> int:
    """A TCP port free on this machine right now (for the rendezvous of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
