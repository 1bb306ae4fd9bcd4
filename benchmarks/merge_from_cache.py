"""The streaming merge with and without the quantize-once cache, against peft's merge into the original base,
on the inputs ``python -m benchmarks.merge --preset issue14`` built (run that first).

``python -m benchmarks.merge_from_cache [WORKDIR]``: builds the cache of that base once (as a training run's
first rank does), then times, alternating, ``repeats`` runs each of: the streaming merge re-quantizing the
checkpoint (what ``benchmarks.merge`` measures), the streaming merge dequantizing the cache's packed weights,
and peft ``merge_and_unload`` into the original bf16 base. All in this process, one after another; wall and
CPU time per run; the two streaming outputs are compared bit for bit. Prints a markdown table.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    work = Path(argv[0]) if argv else Path(tempfile.gettempdir()) / "qlora_dist_bench_merge_issue14"
    repeats = int(argv[1]) if len(argv) > 1 else 3
    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").is_file():
        print(f"no base in {work}: run python -m benchmarks.merge --preset issue14 first", file=sys.stderr)
        return 2
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora_dist import base_cache
    from qlora_dist import model as model_mod
    from qlora_dist.config import ModelConfig, QuantConfig
    from qlora_dist.merge import NF4Rebuild, stream_merge

    cpu, dtype, quant = torch.device("cpu"), torch.bfloat16, QuantConfig()
    root = work / "nf4-cache"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    _, how = base_cache.load_base(
        lambda p: model_mod.load_quantized_model(ModelConfig(name_or_path=p), quant, cpu, dtype),
        str(base), base, quant, dtype, cpu, root, True, lambda: None,
    )  # fmt: skip
    build_s = time.perf_counter() - start
    plain = NF4Rebuild.of(quant, dtype, cpu)
    cached = dataclasses.replace(plain, cache=Path(how.cache_dir))

    def streaming(nf4: NF4Rebuild, out: Path) -> dict:
        out.mkdir()
        return stream_merge(str(base), adapter, out, dtype, nf4)

    def peft_original(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out)

    runs = {
        "streaming, re-quantizing the checkpoint": lambda out: streaming(plain, out),
        "streaming, from the quantize-once cache": lambda out: streaming(cached, out),
        "peft merge_and_unload into the original base": peft_original,
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    outputs: dict[str, Path] = {}
    for i in range(repeats):
        for name, run in runs.items() if i % 2 == 0 else reversed(list(runs.items())):
            out = work / f"probe-{len(outputs)}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu_s = time.perf_counter(), time.process_time()
            run(out)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu_s))
            if i == 0 and name.startswith("streaming"):
                outputs[name] = out
            else:
                shutil.rmtree(out, ignore_errors=True)
    a, b = ({k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()} for p in outputs.values())
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for p in outputs.values():
        shutil.rmtree(p, ignore_errors=True)
    ref = statistics.median(t[0] for t in times["peft merge_and_unload into the original base"])
    print(f"cache build (quantize + write, once): {build_s:.1f} s; streaming outputs bit-identical: {same}\n")
    print("| method | wall (median) | every run | CPU (median) | / peft into the original base |")
    print("|---|---:|---|---:|---:|")
    for name, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        every = ", ".join(f"{t[0]:.1f}" for t in ts)
        print(f"| {name} | {wall:.1f} s | {every} | {statistics.median(t[1] for t in ts):.1f} s | {wall / ref:.2f}x |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
