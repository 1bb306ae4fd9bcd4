"""Benchmark of the rank-0 merge: the streaming merge against peft's ``merge_and_unload`` on the base dequantized
in memory (the in-memory path), on the same synthetic model, in one invocation.

::

    python -m benchmarks.merge                    # ~1.1B-parameter Llama shape in bf16, 1 GB shards; "## Merge"
    python -m benchmarks.merge --preset issue14   # issue 14's 0.5B Llama shape in bf16, 200 MB shards, 3 repeats
    python -m benchmarks.merge --small            # a few million parameters, seconds; prints the table only

The base is built from a config with random weights (no download) and written straight to safetensors shards
of about ``--shard-gb`` GB; the adapter is random LoRA (non-zero B) on every linear layer the training run
quantizes. Each method runs in its own fresh subprocess, which reports its wall time and its peak resident
memory (``VmHWM``, reset right before the merge starts, so imports are not counted in "above baseline"). The
two merged folders are then compared tensor by tensor: they must be bit-identical.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import child_env, machine, write_section

METHODS = ("streaming", "in-memory")
ORIGINAL = "peft-original"
"""The optional third row: peft's ``merge_and_unload`` into the base loaded in the merged dtype (the original
weights, no NF4 round trip), what a user without qlora_dist runs (issue 14's reference; its output differs)."""
SECTION = "## Merge"
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )


FULL = Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)  # TinyLlama-1.1B's
ISSUE14 = Shape(hidden=1024, intermediate=4096, layers=26, heads=16, kv_heads=4, vocab=32000)  # 0.46B, 0.92 GB bf16
SMALL = Shape(hidden=384, intermediate=1024, layers=12, heads=4, kv_heads=2, vocab=2048)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named benchmark: the model, its shard size, the repeats and the BENCHMARKS.md section it writes."""

    shape: Shape
    shard_gb: float
    repeats: int
    section: str | None
    """None: print only (a quick check)."""
    original: bool = False
    """Also measure :data:`ORIGINAL`."""


PRESETS = {
    "full": Preset(FULL, 1.0, 2, SECTION),
    # Issue 14's measurement: a 0.5B Llama-shaped bf16 base in 200 MB shards, both methods writing bf16.
    "issue14": Preset(ISSUE14, 0.2, 3, "## Merge, 0.5B in 200 MB shards (issue 14)", original=True),
    "small": Preset(SMALL, 0.004, 1, None),
}

TINY = Shape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=256)  # the workers' warm-up


# -- inputs -------------------------------------------------------------------------------------------------


def build_base(folder: Path, shape: Shape, dtype: torch.dtype, shard_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Write a Llama-shaped checkpoint with random weights as safetensors shards of at most ``shard_bytes``
    (one tensor at a time: the model is never in memory). Reuses ``folder`` when it already holds this one."""
    from transformers import AutoModelForCausalLM

    from qlora_dist.merge import SAFE_INDEX, _write_safetensors

    stamp = {"shape": dataclasses.asdict(shape), "dtype": str(dtype), "shard_bytes": shard_bytes, "seed": seed}
    marker = folder / "bench_base.json"
    if marker.is_file() and json.loads(marker.read_text()).get("stamp") == stamp:
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = shape.config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = torch.Size(dims).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes

    def produce(name: str, index: int) -> torch.Tensor:
        dims = dict(tensors)[name]
        if name.endswith("norm.weight"):
            return torch.ones(dims, dtype=dtype)
        gen = torch.Generator().manual_seed(seed * 100_003 + index)
        return (torch.randn(dims, generator=gen) * 0.02).to(dtype)

    order = {name: i for i, (name, _) in enumerate(tensors)}
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(name, dtype, list(dims), order[name]) for name, dims in shard]
        total += _write_safetensors(folder / file, entries, produce)
        weight_map.update({name: file for name, _ in shard})
    (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.dtype = dtype
    config.save_pretrained(folder)
    info = {
        "stamp": stamp,
        "params": sum(torch.Size(d).numel() for _, d in tensors),
        "bytes": total,
        "shards": len(shards),
        "largest_shard_bytes": max(p.stat().st_size for p in folder.glob("*.safetensors")),
    }
    marker.write_text(json.dumps(info))
    return info


def build_adapter(folder: Path, base: Path, r: int, alpha: int, compute_dtype: torch.dtype, seed: int = 1) -> int:
    """A random LoRA adapter (peft's format; B non-zero, as after training) on every layer training quantizes,
    with the ``qlora_dist.json`` a run writes beside it. Returns the adapter's bytes."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from qlora_dist.merge import QUANT_META, NF4Rebuild, _tensor_index, quantized_weights_of_config

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = AutoConfig.from_pretrained(base)
    layers = sorted(quantized_weights_of_config(config, NF4Rebuild(compute_dtype=compute_dtype)))
    shapes = {}
    for file in base.glob("*.safetensors"):
        shapes.update({name: info["shape"] for name, info in _tensor_index(file).items()})
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in layers:
        out_features, in_features = shapes[name]
        module = name.removesuffix(".weight")
        state[f"base_model.model.{module}.lora_A.weight"] = (
            torch.randn(r, in_features, generator=gen) / in_features**0.5
        )
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.01
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    targets = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in layers})
    LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", bias="none").save_pretrained(
        folder
    )
    quant = {"quant_type": "nf4", "double_quant": True, "storage_dtype": "auto", "compute_dtype": "auto"}
    meta = {"quant": quant, "compute_dtype": str(compute_dtype).replace("torch.", "")}
    (folder / QUANT_META).write_text(json.dumps(meta))
    return sum(t.numel() * t.element_size() for t in state.values())


# -- one method, in this process (the worker) ---------------------------------------------------------------


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Job:
    """One measured merge: what :func:`measure` runs and :func:`run_worker` hands to a fresh process."""

    method: str
    base: Path
    adapter: Path
    out: Path
    merge_base: str = "dequantized"
    dtype: str = "auto"
    warmup: tuple[Path, Path] | None = None
    """A small base and adapter merged first with the same method, so that lazily imported code and one-time
    buffers do not count against the measured merge."""
    profile: bool = False
    """Also time the streaming merge's steps (:func:`profiled`)."""

    def argv(self) -> list[str]:
        """This job as the worker's command-line arguments (parsed back by :func:`main`)."""
        argv = ["--worker", self.method, "--base", str(self.base), "--adapter", str(self.adapter)]
        argv += ["--out", str(self.out), "--merge-base", self.merge_base, "--dtype", self.dtype]
        argv += ["--profile"] if self.profile else []
        return argv + (["--warmup", str(self.warmup[0]), str(self.warmup[1])] if self.warmup else [])


STEPS = {
    "read": "read (`safe_open`, one tensor at a time)",
    "cast_in": "cast to the compute dtype before quantizing",
    "quantize": "NF4 quantize (`bitsandbytes.functional.quantize_4bit`)",
    "dequantize": "NF4 dequantize (`dequantize_4bit`)",
    "delta": "LoRA delta `(B @ A) * scaling`, float32",
    "cast_add": "casts to the merged dtype, delta add, transposes",
    "write_wait": "waiting for the writer thread (writes not hidden behind compute)",
    "fsync": "fsync of the written files",
    "other": "everything else (plan, configs, tokenizer, rename)",
}


@contextlib.contextmanager
def profiled(seconds: dict[str, float]):
    """Time the streaming merge's steps into ``seconds`` (keys of :data:`STEPS`, wall seconds on the main
    thread), by wrapping the functions that do each step; removed again on exit."""
    import bitsandbytes.functional as bnb_f

    from qlora_dist import merge as merge_mod

    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner, attr: str, key: str):
        real = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start

        patched.append((owner, attr, real))
        setattr(owner, attr, timed)

    for owner, attr, key in (
        (merge_mod, "_read_tensor", "read"),
        (bnb_f, "quantize_4bit", "quantize"),
        (bnb_f, "dequantize_4bit", "dequantize"),
        (merge_mod.NF4Rebuild, "roundtrip", "_roundtrip"),
        (merge_mod._Lora, "delta", "delta"),
        (merge_mod, "_merged_tensor", "_merged"),
        (merge_mod, "_write_safetensors", "_write"),
        (merge_mod, "fsync_file", "fsync"),
    ):
        wrap(owner, attr, key)
    try:
        yield
    finally:
        for owner, attr, real in reversed(patched):
            setattr(owner, attr, real)
    # What the wrapped calls leave over: casts inside the round trip; the rest of _merged_tensor; the time
    # _write_safetensors spends outside producing tensors (header, waiting for the writer thread).
    get = seconds.get
    seconds["cast_in"] = get("_roundtrip", 0) - get("quantize", 0) - get("dequantize", 0)
    seconds["cast_add"] = get("_merged", 0) - get("_roundtrip", 0) - get("delta", 0)
    seconds["write_wait"] = get("_write", 0) - get("_merged", 0) - get("read", 0)


def measure(job: Job) -> dict[str, Any]:
    """Run one merge here and return its wall time, CPU time and peak RSS."""
    import logging

    from qlora_dist.merge import merge_command

    logging.getLogger("qlora_dist").setLevel(logging.WARNING)
    import bitsandbytes  # noqa: F401  (imports are not the merge's memory: load them before the baseline)
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    def merge(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
        # The merge's own memory only: its logit check (which loads the model again) is off; the two methods'
        # outputs are compared tensor by tensor afterwards instead.
        return merge_command(str(base), str(adapter), out, job.merge_base, job.dtype, method=job.method, verify=False)

    if job.warmup is not None:
        scratch = job.out.with_name(job.out.name + ".warmup")
        merge(*job.warmup, scratch)
        shutil.rmtree(scratch)
    gc.collect()
    reset = reset_peak_rss()
    baseline = _status_kib("VmRSS") * 1024
    steps: dict[str, float] = {}
    start, cpu = time.perf_counter(), time.process_time()
    with profiled(steps) if job.profile else contextlib.nullcontext():
        info = merge(job.base, job.adapter, job.out)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = _status_kib("VmHWM") * 1024
    if job.profile:
        steps["other"] = seconds - sum(steps[k] for k in STEPS if k != "other" and k in steps)
    return {
        "profile": {k: round(steps.get(k, 0.0), 3) for k in STEPS} if job.profile else None,
        "method": info["method"],
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "peak_above_baseline_bytes": peak - baseline if reset else None,
        "dtype": info["dtype"],
    }


def run_worker(job: Job, timeout: float | None = None) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (so neither method inherits the other's memory)."""
    cmd = [sys.executable, "-m", "benchmarks.merge", *job.argv()]
    env = child_env(TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{job.method} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- comparing and reporting --------------------------------------------------------------------------------


def identical(a: Path, b: Path) -> bool:
    """Whether two merged folders hold the same tensors, bit for bit (read one tensor at a time)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                out.update({k: file for k in f.keys()})  # noqa: SIM118 (safe_open is not a mapping)
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in sorted(ia):
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                return False
    return True


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def summarize(runs: list[dict]) -> dict[str, Any]:
    """One method's repeats: median wall time (and every time), the largest peaks."""
    times = sorted(r["seconds"] for r in runs)
    above = [r["peak_above_baseline_bytes"] for r in runs]
    return {
        "seconds": statistics.median(times),
        "all_seconds": [r["seconds"] for r in runs],
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "peak_above_baseline_bytes": None if None in above else max(above),
    }


def render(results: dict[str, list[dict]], base_info: dict, adapter_bytes: int, args, same: bool, load) -> str:
    s, m = summarize(results["streaming"]), summarize(results["in-memory"])
    ratio_peak = m["peak_rss_bytes"] / s["peak_rss_bytes"]
    above = (s["peak_above_baseline_bytes"], m["peak_above_baseline_bytes"])
    ratio_above = f"**{above[1] / above[0]:.1f}x**" if all(above) else "n/a"
    command = "python -m benchmarks.merge" + (f" --preset {args.preset}" if args.preset != "full" else "")
    command += f" --repeats {args.repeats}" if args.repeats else ""
    command += f" --shard-gb {args.shard_gb:g}" if args.shard_gb else ""
    shape = base_info["stamp"]["shape"]
    repeats = len(results["streaming"])
    lines = [
        PRESETS[args.preset].section or SECTION,
        "",
        "Rank 0's merge of a LoRA adapter into the dequantized NF4 base (`merge_base: dequantized`), the way"
        " `qlora-dist merge` does it: **streaming** (shard by shard from the safetensors files, each weight"
        " re-quantized to NF4 and dequantized, the LoRA delta added, the tensor written; `qlora_dist/merge.py`)"
        " against **in-memory** (the NF4 model loaded and dequantized, the unquantized base loaded, the weights"
        " copied in, peft's `merge_and_unload`, `save_pretrained`). Both in one invocation, each run in its own"
        f' fresh process, {repeats} run(s) per method, alternating. Peak RSS is `VmHWM` of that process; "above'
        ' baseline" subtracts its RSS right before the merge started (after imports and a warm-up merge of a tiny'
        " model with the same method).",
        "",
        f"- Command: `{command}` (one invocation builds the inputs, runs both, compares, writes this section)",
        f"- Machine: {machine()}",
        f"- Model: Llama-shaped, built from a config with random weights: hidden {shape['hidden']}, intermediate "
        f"{shape['intermediate']}, {shape['layers']} layers, {shape['heads']} heads / {shape['kv_heads']} KV heads,"
        f" vocab {shape['vocab']}: {base_info['params'] / 1e9:.3f}B parameters, {_gb(base_info['bytes'])} in "
        f"{args.dtype}, {base_info['shards']} safetensors shards (largest {_gb(base_info['largest_shard_bytes'])})",
        f"- Adapter: random LoRA (non-zero B) r={args.r}, alpha={2 * args.r}, on every linear layer but the head "
        f"({adapter_bytes / 1e6:.0f} MB in float32); NF4 with double quantization; compute and merge dtype "
        f"{args.dtype}; on the CPU",
        f"- Outputs bit-identical (every tensor, `torch.equal`): **{'yes' if same else 'NO'}**",
        f"- Load average when it started: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)",
        "",
        "| method | wall time (median) | every run | CPU time (median) | peak RSS | peak RSS above baseline |",
        "|---|---:|---|---:|---:|---:|",
    ]
    rows = [("streaming", s), ("in-memory (peft merge_and_unload)", m)]
    o = summarize(results[ORIGINAL]) if results.get(ORIGINAL) else None
    if o is not None:
        rows.append(("peft merge_and_unload into the original base (no NF4 round trip)", o))
    for name, r in rows:
        extra = _gb(r["peak_above_baseline_bytes"]) if r["peak_above_baseline_bytes"] is not None else "n/a"
        every = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
        lines.append(
            f"| {name} | {r['seconds']:.1f} s | {every} s | {r['cpu_seconds']:.1f} s | "
            f"{_gb(r['peak_rss_bytes'])} | {extra} |"
        )
    lines.append(
        f"| **in-memory / streaming** | **{m['seconds'] / s['seconds']:.2f}x** | | "
        f"**{m['cpu_seconds'] / s['cpu_seconds']:.2f}x** | **{ratio_peak:.1f}x** | {ratio_above} |"
    )
    if o is not None:
        lines.append(
            f"| **streaming / peft into the original base** | **{s['seconds'] / o['seconds']:.2f}x** | | "
            f"**{s['cpu_seconds'] / o['cpu_seconds']:.2f}x** | **{s['peak_rss_bytes'] / o['peak_rss_bytes']:.2f}** |"
            + (
                f" {s['peak_above_baseline_bytes'] / o['peak_above_baseline_bytes']:.2f} |"
                if s["peak_above_baseline_bytes"] and o["peak_above_baseline_bytes"]
                else " n/a |"
            )
        )
    lines += [
        "",
        "Streaming holds a few temporary copies of one tensor (bitsandbytes' quantizer makes float32 and int64"
        " intermediates of the weight it quantizes; the largest tensors here are the embedding and the head) plus"
        " the adapter, whatever the number of layers; the in-memory path holds the whole unquantized model and"
        " its dequantized weights at once. Both quantize every linear weight with bitsandbytes' CPU kernels,"
        " compute the same LoRA deltas and write the same bytes, so their times are of the same order. Other"
        " jobs shared the machine's 2 cores while this ran, so wall times are noisy (the same method's runs"
        " differ by up to 2x); read the ratios, measured in the same invocation with the runs alternating, and"
        " the CPU time (all threads of the process), which contention distorts less.",
        "",
    ]
    if o is not None:
        lines[-1:-1] = [
            "",
            "The third row is what a user without qlora_dist runs: the base loaded in the merged dtype, peft's"
            " `merge_and_unload`, `save_pretrained`. It skips the NF4 round trip, so its output is the original base"
            " plus the delta, not the model that was trained (the first two rows' output): it is the reference for"
            " memory and time, not for the result.",
        ]
    return "\n".join(lines)


def render_profile(result: dict, load) -> str:
    """One profiled streaming merge as a markdown table: seconds and share of the wall time per step."""
    total = result["seconds"]
    lines = [
        f"Profiled streaming merge: {total:.1f} s wall, {result['cpu_seconds']:.1f} s CPU, peak RSS "
        f"{_gb(result['peak_rss_bytes'])}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.",
        "",
        "| step | seconds | share |",
        "|---|---:|---:|",
    ]
    for key, label in STEPS.items():
        lines.append(f"| {label} | {result['profile'][key]:.1f} | {result['profile'][key] / total:.0%} |")
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="model, shards, repeats (default full)")
    p.add_argument("--small", action="store_true", help="--preset small: a small model, a quick check (prints only)")
    p.add_argument("--workdir", type=Path, default=None, help="where inputs and outputs go (default: a tmp dir)")
    p.add_argument("--output", type=Path, default=None, help="markdown file to write (default: BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print the section, write no file")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha is 2r)")
    p.add_argument("--shard-gb", type=float, default=None, help="base shard size (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="runs per method, alternating (default: the preset's)")
    p.add_argument("--keep", action="store_true", help="keep the merged outputs")
    p.add_argument("--json", type=Path, default=None, help="also write the raw measurements to this JSON file")
    p.add_argument(
        "--profile", action="store_true", help="instead: one streaming merge with its steps timed (prints a table)"
    )
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--merge-base", default="dequantized", help=argparse.SUPPRESS)
    p.add_argument("--warmup", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        warmup = tuple(args.warmup) if args.warmup else None
        job = Job(args.worker, args.base, args.adapter, args.out, args.merge_base, args.dtype, warmup, args.profile)
        result = measure(job)
        print(json.dumps(result))
        return 0

    if args.dtype == "auto":
        p.error("--dtype auto is for the workers: give the benchmark a concrete dtype")
    from qlora_dist.cli import setup_logging

    setup_logging()
    if args.small:
        args.preset = "small"
    preset = PRESETS[args.preset]
    load = os.getloadavg()
    dtype = getattr(torch, args.dtype)
    shape = preset.shape
    shard_bytes = int((args.shard_gb or preset.shard_gb) * 1e9)
    suffix = "" if args.preset == "full" else f"_{args.preset}"
    default_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"qlora_dist_bench_merge{suffix}"
    workdir = args.workdir or default_dir
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building the base in {workdir / 'base'} ...", flush=True)
    base_info = build_base(workdir / "base", shape, dtype, shard_bytes)
    adapter_bytes = build_adapter(workdir / "adapter", workdir / "base", args.r, 2 * args.r, dtype)
    # Each worker first merges a tiny model with the same method, so one-time costs (lazy imports, first calls
    # into the kernels) stay out of the measured merge.
    build_base(workdir / "warmup_base", TINY, dtype, shard_bytes=1 << 20)
    build_adapter(workdir / "warmup_adapter", workdir / "warmup_base", args.r, 2 * args.r, dtype)
    warmup = (workdir / "warmup_base", workdir / "warmup_adapter")
    for file in (workdir / "base").glob("*.safetensors"):  # the same warm page cache for both methods
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    if args.profile:
        out = workdir / "merged-profiled"
        shutil.rmtree(out, ignore_errors=True)
        job = Job(
            "streaming", workdir / "base", workdir / "adapter", out, dtype=args.dtype, warmup=warmup, profile=True
        )
        result = run_worker(job)
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(result))
        print(render_profile(result, load))
        return 0
    repeats = args.repeats or preset.repeats
    names = (*METHODS, ORIGINAL) if preset.original else METHODS
    results: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:  # alternate which goes first
            out = workdir / f"merged-{name}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"running {name} ({rep + 1}/{repeats}) ...", flush=True)
            method, merge_base = ("in-memory", "original") if name == ORIGINAL else (name, "dequantized")
            result = run_worker(Job(method, workdir / "base", workdir / "adapter", out, merge_base, args.dtype, warmup))
            results[name].append(result)
            print(json.dumps(result), flush=True)
    same = identical(workdir / "merged-streaming", workdir / "merged-in-memory")
    section = render(results, base_info, adapter_bytes, args, same, load)
    print()
    print(section)
    if args.json is not None:
        raw = {"results": results, "base": base_info, "adapter_bytes": adapter_bytes, "identical": same}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    target = args.output or (None if preset.section is None else REPO / "BENCHMARKS.md")
    if target is not None and not args.no_write:
        write_section(target, section)
        print(f"wrote {target}")
    if not args.keep:
        for name in names:
            shutil.rmtree(workdir / f"merged-{name}", ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
