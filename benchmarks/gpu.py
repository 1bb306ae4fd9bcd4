"""The GPU check: one script for the day a GPU is lent (``make bench-gpu``, ``python -m benchmarks.gpu``).

On one GPU, on a Llama-3-8B-shaped model built from a config with random bfloat16 weights, in one invocation:

- the throughput benchmark of :mod:`benchmarks.throughput` with one process: (a) the reference ``Trainer`` + peft +
  bitsandbytes recipe, (b) qlora_dist, (c) qlora_dist with packing; time per step and non-pad tokens/s;
- model FLOPs utilisation: ``4 x N x non-pad tokens/s`` (``N``: parameters outside the input embedding; a
  frozen base costs a forward and the backward to the activations, no weight gradients) against the device's
  measured dense matmul rate in the compute dtype (bfloat16 8192^3 products here; attention is not counted);
- peak memory (``torch.cuda.max_memory_allocated`` of the training process) against the memory planner's
  ``peak_allocated_bytes`` for the same config: the packed run fills every row to ``max_length``, the length
  the planner plans for, so it is the one held to the 15% bound; unpacked batches are shorter;
- paged 8-bit AdamW on CUDA: its state is a paged tensor in CUDA managed memory, outside PyTorch's allocator.

Everything is printed as one table and written to ``--markdown`` (the ``## GPU check`` section) and ``--json``.
Each part that fails is reported in the table with its error and the others still run, so one run of a few
minutes on a borrowed machine says as much as it can.

The GPU machines have torch, transformers, peft and accelerate but not bitsandbytes or datasets:
``make gpu-wheels`` (on a machine with pip) downloads them into ``.whl/`` and ``make bench-gpu`` installs them
to a temporary folder before it runs. DeepSpeed is not needed.

``--tiny`` runs the same code on a tiny shape, on the CPU where there is no GPU; the unit tests use it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.throughput import LABELS, QUICK, Setup, format_table, run_bench, write_section

SECTION = "## GPU check"

LLAMA3_8B = Setup(
    **asdict(common.LLAMA3_8B),
    model_dtype="bfloat16",
    max_length=1024,
    micro_batch_size=4,
    processes=1,
    steps=6,
    repeats=1,
    grouped_row=False,
    timeout_s=420,
)
"""About 8.0e9 parameters. 6 steps of 4 rows per recipe should keep the whole check near 5 minutes on an H200:
an estimate (three loads of 16 GB of weights dominate), not yet a measurement."""

TINY = QUICK
"""The smoke shape: the throughput benchmark's own quick setup."""

PLANNER_TOLERANCE = 0.15


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (runs on a CPU too): a smoke run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-dist-bench-gpu"), help="models and runs")
    parser.add_argument("--markdown", type=Path, default=None, help="write the '## GPU check' section here")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("qlora-dist bench-gpu: no CUDA device here; --tiny runs the same check on a tiny shape", file=sys.stderr)
        return 2
    missing = _missing_packages()
    if missing:
        print(
            f"qlora-dist bench-gpu: {', '.join(missing)} not importable. On a machine with pip run "
            "`make gpu-wheels`, bring the .whl folder along, and start with `make bench-gpu`.",
            file=sys.stderr,
        )
        return 2
    setup = TINY if args.tiny else LLAMA3_8B
    started = time.perf_counter()
    result = run_gpu_check(setup, args.work)
    result["wall_s"] = time.perf_counter() - started
    text = format_report(result)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        write_section(args.markdown, SECTION + "\n\n" + text + "\n")
        print(f"wrote the '{SECTION[3:]}' section of {args.markdown}")
    return 0 if not result["errors"] else 1


def _missing_packages() -> list[str]:
    import importlib.util

    return [name for name in ("bitsandbytes", "datasets", "peft", "accelerate") if not importlib.util.find_spec(name)]


def run_gpu_check(setup: Setup, work: Path) -> dict[str, Any]:
    """Every part of the check; a part that raises is recorded under ``errors`` and the rest still run."""
    result: dict[str, Any] = {"setup": asdict(setup), "errors": {}}
    parts = [
        ("environment", lambda: environment()),
        ("matmul", lambda: matmul_rate()),
        ("paged_optimizer", lambda: paged_optimizer_check()),
        ("bench", lambda: run_bench(setup, work, log=lambda line: print(line, flush=True))),
        ("planner", lambda: planner_check(work)),
    ]
    for name, part in parts:
        print(f"bench-gpu: {name} ...", flush=True)
        try:
            result[name] = part()
        except Exception as e:  # noqa: BLE001 - reported in the table; the other parts still run
            result["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if "bench" in result and "matmul" in result:
        result["mfu"] = model_flops_utilisation(result["bench"]["summary"], work, result["matmul"]["flops_per_s"])
    return result


def environment() -> dict[str, Any]:
    """The device and the library versions the check ran with."""
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": sys.version.split()[0],
    }


def matmul_rate() -> dict[str, Any]:
    """The device's measured dense matmul rate in the training compute dtype: the denominator of MFU."""
    import torch

    cuda = torch.cuda.is_available()
    device, dtype, n = ("cuda", torch.bfloat16, 8192) if cuda else ("cpu", torch.float32, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    repeats = 10
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    seconds = (time.perf_counter() - t0) / repeats
    return {"size": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / seconds}


def paged_optimizer_check() -> dict[str, Any]:
    """bitsandbytes' paged 8-bit AdamW on CUDA: the state is paged and PyTorch's allocator does not hold it."""
    import bitsandbytes as bnb
    import torch

    if not torch.cuda.is_available():
        return {"ran": False, "why": "needs CUDA (on a CPU bitsandbytes runs paged optimizers unpaged)"}
    param = torch.nn.Parameter(torch.randn(1 << 24, device="cuda"))  # 16M fp32 values: 16 MiB of 8-bit state x 2
    optimizer = bnb.optim.PagedAdamW8bit([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    before = param.detach().clone()
    allocated = torch.cuda.memory_allocated()
    optimizer.step()
    torch.cuda.synchronize()
    state = optimizer.state[param]
    state_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k in ("state1", "state2"))
    grown = torch.cuda.memory_allocated() - allocated
    return {
        "ran": True,
        "paged": bool(getattr(state["state1"], "is_paged", False) and getattr(state["state2"], "is_paged", False)),
        "state_bytes": state_bytes,
        "allocator_growth_bytes": grown,
        "outside_allocator": grown < state_bytes / 2,
        "updated": not torch.equal(before, param.detach()),
    }


def planner_check(work: Path) -> dict[str, Any]:
    """Planned ``peak_allocated_bytes`` against the measured peak of each qlora_dist run of the first repeat."""
    import torch

    from qlora_dist.config import load_config
    from qlora_dist.plan import plan_memory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = {}
    for recipe in ("qlora_dist", "qlora_dist_packed"):
        run = work / "runs" / f"r0-{recipe}"
        plan = plan_memory(load_config(run / "run.yaml"), gpus=1, device=device)
        report = json.loads((run / "out" / "run_report.json").read_text())
        measured = report["peak_memory_bytes"][0]
        rows[recipe] = {
            "planned_bytes": plan.peak_allocated_bytes,
            "measured_bytes": measured,
            "ratio": plan.peak_allocated_bytes / measured,
        }
    packed = rows["qlora_dist_packed"]
    return {
        "device": device,
        "rows": rows,
        # On a CPU the measured peak is the process's RSS (libraries included): not what the planner plans.
        "comparable": device == "cuda",
        "within_tolerance": abs(packed["ratio"] - 1) <= PLANNER_TOLERANCE,
    }


def model_flops_utilisation(summary: dict[str, dict], work: Path, peak_flops: float) -> dict[str, float]:
    """``4 x N x non-pad tokens/s / matmul rate`` per recipe, ``N`` the parameters outside the input embedding."""
    from transformers import AutoConfig

    from qlora_dist.config import load_config
    from qlora_dist.plan import model_layout

    model_dir = load_config(work / "runs" / "r0-qlora_dist" / "run.yaml").model.name_or_path
    layout = model_layout(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    n = layout.total_params - config.vocab_size * config.hidden_size
    return {recipe: 4 * n * s["tokens_per_s"]["median"] / peak_flops for recipe, s in summary.items()}


def format_report(result: dict[str, Any]) -> str:
    """Markdown: what ran where, the throughput table with MFU and planned memory, the paged check, errors."""
    setup = Setup(**result["setup"])
    env = result.get("environment", {})
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m benchmarks.gpu` "
        f"(about {result.get('wall_s', 0) / 60:.0f} minutes) on {env.get('device', '?')}; torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}), transformers {env.get('transformers')}, peft {env.get('peft')}, "
        f"bitsandbytes {env.get('bitsandbytes')}, accelerate {env.get('accelerate')}.",
        "",
        f"Model: Llama built from a config, hidden {setup.hidden_size}, {setup.layers} layers, intermediate "
        f"{setup.intermediate_size}, {setup.heads}/{setup.kv_heads} heads, vocabulary "
        f"{setup.vocab_size or 'of the bench tokenizer'}, random {setup.model_dtype} weights loaded as NF4 (double "
        f"quantization); LoRA r={setup.lora_r} on all linear layers; {setup.optimizer}; gradient checkpointing; "
        f"{setup.processes} process, {setup.micro_batch_size} rows per step, max_length {setup.max_length}, "
        f"{setup.steps} steps per recipe (the first not timed), {setup.repeats} repeat(s).",
        "",
    ]
    bench = result.get("bench")
    if bench:
        lines += [format_table(bench["summary"], markdown=True), ""]
    mfu, matmul = result.get("mfu"), result.get("matmul")
    if mfu and matmul:
        rate = f"{matmul['flops_per_s'] / 1e12:.1f} TFLOP/s ({matmul['dtype']} {matmul['size']}^3 matmul)"
        cells = ", ".join(f"{LABELS[r]} {v:.1%}" for r, v in mfu.items())
        lines += [f"Model FLOPs utilisation (4 x N x non-pad tokens/s against a measured {rate}): {cells}.", ""]
    planner = result.get("planner")
    if planner:
        lines.append("| run | planned peak_allocated | measured peak | planned / measured |")
        lines.append("|---|---|---|---|")
        for recipe, row in planner["rows"].items():
            lines.append(
                f"| {LABELS[recipe]} | {row['planned_bytes'] / 2**30:.2f} GiB | "
                f"{row['measured_bytes'] / 2**30:.2f} GiB | {row['ratio']:.3f} |"
            )
        if planner["comparable"]:
            verdict = "within" if planner["within_tolerance"] else "NOT within"
            lines.append(
                f"\nPlanner: the packed run (rows of max_length, as planned) is {verdict} "
                f"{PLANNER_TOLERANCE:.0%} of `torch.cuda.max_memory_allocated`."
            )
        else:
            lines.append("\nPlanner: measured on a CPU (peak RSS, libraries included): not comparable; GPU only.")
        lines.append("")
    paged = result.get("paged_optimizer")
    if paged:
        if paged["ran"]:
            lines.append(
                f"Paged AdamW 8-bit on CUDA: state paged {paged['paged']}, {paged['state_bytes'] / 2**20:.0f} MiB of "
                f"state, PyTorch's allocator grew by {paged['allocator_growth_bytes'] / 2**20:.0f} MiB "
                f"(outside the allocator: {paged['outside_allocator']}), parameters updated {paged['updated']}."
            )
        else:
            lines.append(f"Paged AdamW 8-bit: not run ({paged['why']}).")
    for name, error in result["errors"].items():
        lines.append(f"\n**{name} failed**: `{error}`")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
