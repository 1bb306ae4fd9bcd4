"""Memory and start-up: the chunked loss, the quantize-once cache and the token-balanced rank split, each against
its reference in the same invocation (``python -m benchmarks.memory``; writes BENCHMARKS.md "## Memory and
start-up").

- **loss**: one process per recipe (so each has its own peak RSS) trains ``steps`` optimizer steps of a
  2-layer Llama with a large vocabulary on the same NF4 base + LoRA, gradient checkpointing on: (a) the
  reference loss (the model's own ``labels=`` loss, what ``Trainer`` calls: full logits, upcast inside
  transformers' loss function), (b) qlora_dist with ``train.chunked_loss=false`` (full logits), (c) qlora_dist's
  chunked loss. Measured: the peak bytes of tensors alive at once during a step (a torch dispatch mode counting
  every storage created and not yet freed; weights, adapters and optimizer state excluded), the same for the
  loss alone (from the final hidden states to their gradient), the process's peak RSS (``ru_maxrss``:
  includes the ~0.4 GB of imported libraries and the weights), and steps/s (median of the timed steps).
- **start-up**: ``qlora-dist train`` on 2 ranks (``accelerate launch``, DDP on CPU) for one optimizer step,
  without the cache, then with the cache twice (the first builds it, the second loads it). Measured: the
  launch's wall time (process start to exit: imports, data, base load, one step, saving the adapter) and, from
  the run report, each rank's base-load time, where its base came from and the bytes of weight files it read.
- **rank wait**: ``qlora-dist train`` on 2 ranks, padded batches (no packing, no grouping) of the right-skewed
  bench data, ``data.balance_tokens`` off and on: the share of a step a rank spends with the gradient
  all-reduce in flight (``comm_seconds_per_step`` / seconds per step; the rank that waits for the other has
  the larger share) and non-pad tokens/s.

The default shapes are scaled down to fit a shared 2-core machine (the issue's are in ``--full``); every number
printed is measured in this invocation, ratios against the reference of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import BENCHMARKS_MD, REPO, child_env, machine, write_section, write_subsections

SECTION = "## Memory and start-up"
DATA = REPO / "examples" / "data" / "bench" / "alpaca_varlen.jsonl"


@dataclass
class Shape:
    vocab: int = 65536
    hidden: int = 128
    layers: int = 2
    batch: int = 4
    seq: int = 256
    steps: int = 4
    """Optimizer steps per loss recipe; the first is warm-up and not timed."""
    startup_hidden: int = 1024
    startup_layers: int = 8
    startup_vocab: int = 32000
    wait_steps: int = 16
    wait_repeats: int = 3
    """Runs of each split, alternating."""


SMALL = Shape()
FULL = replace(SMALL, hidden=256, batch=8, seq=512, startup_hidden=1024, startup_layers=16)


# -- the loss --------------------------------------------------------------------------------------------------


def build_model(folder: Path, vocab: int, hidden: int, layers: int) -> Path:
    """A random Llama with ``vocab`` entries saved in bfloat16 (and a tokenizer: the runs need one)."""
    from qlora_dist.tiny import build_tiny_model, demo_texts, train_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = train_tokenizer(demo_texts(), folder / "tokenizer", vocab_size=1024)
    import torch

    build_tiny_model(
        folder, tokenizer, hidden_size=hidden, layers=layers, dtype=torch.bfloat16, vocab_size=vocab,
        num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 128),
    )  # fmt: skip
    return folder


def loss_worker(model_dir: Path, recipe: str, shape: Shape) -> dict[str, Any]:
    """One recipe's steps in this process (``recipe`` in reference | full | chunked)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
    from qlora_dist.loss import token_loss_sum
    from qlora_dist.model import attach_lora, enable_gradient_checkpointing, load_quantized_model

    class LiveBytes(TorchDispatchMode):
        def __init__(self, known):
            super().__init__()
            self.known, self.live, self.peak, self.refs = known, 0, 0, {}

        def _freed(self, key, n):
            self.refs.pop(key, None)
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    key, n = id(s), s.nbytes()
                    if key not in self.refs and n and s.data_ptr() not in self.known:
                        self.refs[key] = weakref.ref(s, lambda _, k=key, n=n: self._freed(k, n))
                        self.live += n
                        self.peak = max(self.peak, self.live)
            return out

    torch.manual_seed(0)
    base = load_quantized_model(ModelConfig(str(model_dir)), QuantConfig(), torch.device("cpu"), torch.float32)
    enable_gradient_checkpointing(base)
    model = attach_lora(base, LoraConfig(r=16, alpha=32, dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def step_loss(recipe=recipe):
        if recipe == "reference":  # transformers' own loss: shift inside, mean over tokens (as Trainer calls it)
            return model(**batch, use_cache=False).loss
        return token_loss_sum(model, batch, None if recipe == "full" else 0) / (shape.batch * (shape.seq - 1))

    if recipe == "timing":  # full and chunked steps alternating in one process: the same machine state
        ratios = []
        for i in range(2 * shape.steps):
            spent = {}
            for name in ("full", "chunked") if i % 2 else ("chunked", "full"):
                start = time.perf_counter()
                step_loss(name).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                spent[name] = time.perf_counter() - start
            if i:  # the first pair warms up
                ratios.append(spent["chunked"] / spent["full"])
        return {"recipe": recipe, "chunked_over_full": statistics.median(ratios), "ratios": ratios}

    times, step_peak = [], 0
    for i in range(shape.steps):
        known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        for p in params:
            for t in optimizer.state.get(p, {}).values():
                if torch.is_tensor(t):
                    known.add(t.untyped_storage().data_ptr())
        start = time.perf_counter()
        if i == shape.steps - 1:  # the last step under the tracker (it slows every op a little)
            with LiveBytes(known) as tracker:
                step_loss().backward()
            step_peak = tracker.peak
        else:
            step_loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if 0 < i < shape.steps - 1:
            times.append(time.perf_counter() - start)

    # The loss alone: from final hidden states (as the decoder hands them over) to their gradient.
    hidden = torch.randn(shape.batch, shape.seq, shape.hidden, generator=g, requires_grad=True)
    head = model.get_output_embeddings()
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100).flatten()
    with LiveBytes({head.weight.untyped_storage().data_ptr(), hidden.untyped_storage().data_ptr()}) as tracker:
        if recipe == "chunked":
            from qlora_dist.loss import HeadSpec, _ChunkedLoss, auto_chunk_tokens

            spec = HeadSpec.of(model)
            rows = (labels != -100).nonzero().squeeze(1)
            chunk = auto_chunk_tokens(shape.vocab)
            loss = _ChunkedLoss.apply(hidden.flatten(0, 1).index_select(0, rows), labels[rows], spec, chunk)
        else:
            logits = head(hidden)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="sum")
        loss.backward()
    loss_peak = tracker.peak
    return {
        "recipe": recipe,
        "step_peak_bytes": step_peak,
        "loss_peak_bytes": loss_peak,
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": statistics.median(times) if times else None,
        "tokens_per_step": shape.batch * shape.seq,
    }


def run_loss(work: Path, shape: Shape) -> dict[str, dict]:
    model_dir = build_model(work / f"llama_v{shape.vocab}_h{shape.hidden}", shape.vocab, shape.hidden, shape.layers)
    out = {}
    for recipe in ("reference", "full", "chunked", "timing"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "_loss_worker",
            str(model_dir),
            recipe,
            json.dumps(asdict(shape)),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(OMP_NUM_THREADS="2"), cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"loss worker {recipe} failed:\n{proc.stderr[-3000:]}")
        out[recipe] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  loss {recipe}: {out[recipe]}", flush=True)
    return out


# -- runs through qlora-dist train --------------------------------------------------------------------------------


def _train(work: Path, name: str, model_dir: Path, cache: Path, train: dict, quant: dict, data: dict) -> dict:
    out = work / name
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(DATA), "format": "alpaca", "max_length": 1024, **data},
        "train": {"micro_batch_size": 4, "lr": 1e-4, "warmup_ratio": 0.0, "optimizer": "adamw", "save_steps": 0,
                  **train},
        "quant": quant,
        "output": {"dir": str(out), "merge": False, "overwrite": True},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from qlora_dist.demo import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch_configs" / "multi_gpu_ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "qlora_dist", "train", str(path)]  # fmt: skip
    env = child_env(QLORA_DIST_CACHE=str(cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    report = json.loads((out / "run_report.json").read_text())
    assert report["world_size"] == 2, report["world_size"]
    return {"wall_s": wall, "report": report}


def run_startup(work: Path, shape: Shape) -> dict[str, dict]:
    model_dir = build_model(
        work / f"llama_startup_h{shape.startup_hidden}_l{shape.startup_layers}",
        shape.startup_vocab, shape.startup_hidden, shape.startup_layers,
    )  # fmt: skip
    cache = work / "cache_startup"
    import shutil

    shutil.rmtree(cache / "nf4", ignore_errors=True)
    train = {"max_steps": 1}
    data = {"max_length": 256}
    out = {}
    for name, quant in (("uncached", {"cache": False}), ("cache_build", {}), ("cache_load", {})):
        run = _train(work, f"startup_{name}", model_dir, cache, train, quant, data)
        loads = run["report"]["base_load_per_rank"]
        out[name] = {"wall_s": run["wall_s"], "base_load": loads, "checksum": run["report"]["base_checksum_before"]}
        # Rank 0's process start to its first step (the step itself, the same work in all three runs, and what
        # follows it would dilute the ratio).
        out[name]["startup_s"] = run["report"]["startup_seconds"]
        print(f"  start-up {name}: wall {run['wall_s']:.1f}s, loads {loads}", flush=True)
    out["params"] = run["report"]["total_params"]
    out["checkpoint_bytes"] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return out


def run_wait(work: Path, shape: Shape) -> dict[str, dict]:
    """Both splits ``shape.wait_repeats`` times, alternating (count, token, token, count, ...): medians."""
    model_dir = build_model(work / "llama_wait", 4096, 256, 2)
    runs: dict[str, list[dict]] = {"count_split": [], "token_balanced": []}
    order = [("count_split", False), ("token_balanced", True)]
    for i in range(shape.wait_repeats):
        for name, balance in order if i % 2 == 0 else order[::-1]:
            train = {"max_steps": shape.wait_steps}
            run = _train(work, f"wait_{name}", model_dir, work / "cache_wait", train, {}, {"balance_tokens": balance})
            r = run["report"]
            step_s = r["train_seconds"] / r["steps"]
            shares = [c / step_s if c is not None else None for c in r["comm_seconds_per_step"]]
            runs[name].append({"comm_share_per_rank": shares, "tokens_per_s": r["tokens_per_s"], "step_s": step_s,
                               "micro_batches_per_step": r.get("micro_batches_per_step")})  # fmt: skip
            print(f"  rank wait {name} repeat {i}: {runs[name][-1]}", flush=True)
    out = {}
    for name, rows in runs.items():
        out[name] = {
            "comm_share_per_rank": [
                statistics.median(r["comm_share_per_rank"][k] or 0.0 for r in rows) for k in (0, 1)
            ],
            "largest_share": [max(c or 0.0 for c in r["comm_share_per_rank"]) for r in rows],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in rows],
            "step_s": statistics.median(r["step_s"] for r in rows),
            "micro_batches_per_step": [r["micro_batches_per_step"] for r in rows],
        }
    return out


# -- report -------------------------------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f} GiB"


def render(result: dict, command: str) -> str:
    shape = result["shape"]
    lines = [SECTION, "", f"Measured {result['when']} by `{command}` ({result['wall_s']:.0f} s).", ""]
    lines.append(f"- Machine: {result['machine']}")
    if "loss" in result:
        loss = result["loss"]
        ref = loss["reference"]
        lines += [
            "",
            f"### Loss: vocabulary {shape['vocab']}, micro-batch {shape['batch']} x {shape['seq']} tokens, "
            f"hidden {shape['hidden']}, {shape['layers']} layers, NF4 base + LoRA r=16, checkpointing, 1 process "
            f"(measured {loss.get('measured', result['when'])})",
            "",
            "| recipe | step peak (tensors) | / ref | loss-only peak | / ref | peak RSS | / ref | step s | / ref |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, label in (("reference", "(a) model's own loss (Trainer)"), ("full", "(b) qlora_dist, full logits"),
                            ("chunked", "(c) qlora_dist, chunked loss")):  # fmt: skip
            r = loss[name]
            lines.append(
                f"| {label} | {_gib(r['step_peak_bytes'])} | {r['step_peak_bytes'] / ref['step_peak_bytes']:.2f} "
                f"| {_gib(r['loss_peak_bytes'])} | {r['loss_peak_bytes'] / ref['loss_peak_bytes']:.2f} "
                f"| {_gib(r['rss_bytes'])} | {r['rss_bytes'] / ref['rss_bytes']:.2f} "
                f"| {r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f} |"
            )
        t = loss["timing"]
        lines.append(
            f"\nChunking's time cost: (c)/(b) step time {t['chunked_over_full']:.2f} (median of "
            f"{len(t['ratios'])} back-to-back pairs in one process, range {min(t['ratios']):.2f}-"
            f"{max(t['ratios']):.2f}); the step times in the table come from separate processes, one after the "
            "other, on a shared machine."
        )
    if "startup" in result:
        s = result["startup"]
        lines += [
            "",
            f"### Start-up: 2 ranks (DDP, CPU), {s['params'] / 1e6:.0f}M-parameter Llama, "
            f"{s['checkpoint_bytes'] / 1e9:.2f} GB bf16 checkpoint, `qlora-dist train` for one step "
            f"(measured {s.get('measured', result['when'])})",
            "",
            "| run | launch wall s | / uncached | start-up s (rank 0: process start to first step) | / uncached | "
            "base load s (rank 0, 1) | source (rank 0, 1) | weight bytes read (rank 0, 1) | disk reads (rank 0, 1) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("uncached", "cache_build", "cache_load"):
            r = s[name]
            loads = r["base_load"]
            disk = ", ".join(
                "n/a" if x["disk_read_bytes"] is None else f"{x['disk_read_bytes'] / 1e9:.2f} GB" for x in loads
            )
            seconds = ", ".join(f"{x['seconds']:.1f}" for x in loads)
            sources = ", ".join(x["source"] for x in loads)
            files = ", ".join(f"{x['file_bytes'] / 1e9:.2f} GB" for x in loads)
            ratio = r["wall_s"] / s["uncached"]["wall_s"]
            up = (
                f"{r['startup_s']:.1f} | {r['startup_s'] / s['uncached']['startup_s']:.2f}"
                if "startup_s" in r
                else "n/a | n/a"
            )
            lines.append(
                f"| {name} | {r['wall_s']:.1f} | {ratio:.2f} | {up} | {seconds} | {sources} | {files} | {disk} |"
            )
        same = len({s[n]["checksum"] for n in ("uncached", "cache_build", "cache_load")}) == 1
        lines.append(f"\nBase checksum identical in all three runs: {same}.")
    if "wait" in result:
        w = result["wait"]
        lines += [
            "",
            "### Rank wait: 2 ranks (DDP, CPU), padded batches of the bench data, micro-batch 4, no packing "
            f"(measured {w.get('measured', result['when'])})",
            "",
            "| split | all-reduce in flight / step, median (rank 0, 1) | largest rank's, each run | step s | "
            "non-pad tokens/s | / count split | micro-batches / step / rank, each run |",
            "|---|---|---|---|---|---|---|",
        ]
        base = w["count_split"]["tokens_per_s"]
        for name in ("count_split", "token_balanced"):
            r = w[name]
            shares = ", ".join("n/a" if c is None else f"{100 * c:.0f}%" for c in r["comm_share_per_rank"])
            each = ", ".join(f"{100 * c:.0f}%" for c in r.get("largest_share", []))
            micro = ", ".join("n/a" if m is None else f"{m:.2f}" for m in r.get("micro_batches_per_step", []))
            lines.append(
                f"| {name} | {shares} | {each} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['tokens_per_s'] / base:.2f} | {micro or 'n/a'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_loss_worker"]:
        result = loss_worker(Path(argv[1]), argv[2], Shape(**json.loads(argv[3])))
        print(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the issue's shapes (8 x 512 tokens, ...): slow on a CPU")
    p.add_argument("--only", nargs="*", choices=["loss", "startup", "wait"], default=["loss", "startup", "wait"])
    p.add_argument("--startup-shape", nargs=2, type=int, metavar=("HIDDEN", "LAYERS"),
                   help="the start-up model's width and depth (default 1024 8: 143M; 1536 20: 0.52B)")  # fmt: skip
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "bench-memory")
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the parts of the last results.json not rerun now")
    args = p.parse_args(argv)
    shape = FULL if args.full else SMALL
    if args.startup_shape:
        shape = replace(shape, startup_hidden=args.startup_shape[0], startup_layers=args.startup_shape[1])
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "shape": asdict(shape),
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    previous = args.work / "results.json"
    if args.keep and previous.is_file():  # parts not rerun now keep their earlier measurement (and its time)
        old = json.loads(previous.read_text())
        result.update({k: old[k] for k in ("loss", "startup", "wait") if k in old and k not in args.only})
    runners = {"loss": run_loss, "startup": run_startup, "wait": run_wait}
    for part in args.only:
        result[part] = runners[part](args.work, shape)
        result[part]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["wall_s"] = time.perf_counter() - start
    (args.work / "results.json").write_text(json.dumps(result, indent=1))
    text = render(result, "python -m benchmarks.memory " + " ".join(argv))
    print(text)
    if not args.no_markdown:  # a partial rerun replaces only its own tables
        (write_section if set(result) >= {"loss", "startup", "wait"} else write_subsections)(args.markdown, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
