"""Loading a mixture-of-experts base through the quantized-base cache against quantizing it, in one invocation.

    PYTHONPATH=. python benchmarks/bench_moe_cache.py [--hidden 256] [--layers 4] [--repeats 3]

Builds a Mixtral-shaped model locally (8 experts, top-2, ffn = 3.5 x hidden; random weights, nothing
downloaded), writes its quantized-base cache once (``qlora_dist.base_cache``: packed NF4 experts in files of
their own), then alternates the two loads ``--repeats`` times on this machine's device:

- ``checkpoint``: the ordinary load, 16-bit checkpoint quantized (bitsandbytes for the linears, qlora_dist per
  expert), what every rank paid at every start before;
- ``cache``: the cached folder, restored without quantizing.

Prints wall and CPU seconds of each (best and all repeats), the weight bytes each read, the ratio cache /
checkpoint, and whether the base checksums are equal (they must be). Files are read from the page cache here:
the bytes column is what a cold machine reads from storage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from qlora_dist import base_cache
    from qlora_dist import model as model_mod
    from qlora_dist.config import ModelConfig, QuantConfig
    from qlora_dist.tiny import build_tiny_model, demo_texts, train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = QuantConfig(storage_dtype="uint8")

    def load(path: str):
        return model_mod.load_quantized_model(ModelConfig(name_or_path=path), quant, device, dtype)

    # Progress bars and warnings to /dev/null: only the table is printed.
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        folder, root = Path(tmp) / "mixtral", Path(tmp) / "nf4"
        build_tiny_model(folder, train_tokenizer(demo_texts(), folder), arch="mixtral", hidden_size=args.hidden,
                         layers=args.layers)  # fmt: skip

        def timed(cache_root):
            wall, cpu = time.perf_counter(), time.process_time()
            model, how = base_cache.load_base(load, str(folder), folder, quant, dtype, device, cache_root, True,
                                              lambda: None)  # fmt: skip
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            return {"wall": wall, "cpu": cpu, "bytes": how.file_bytes, "source": how.source,
                    "checksum": model_mod.base_checksum(model)}  # fmt: skip

        built = timed(root)
        runs: dict[str, list[dict]] = {"checkpoint": [], "cache": []}
        for r in range(args.repeats):
            order = ("checkpoint", "cache") if r % 2 == 0 else ("cache", "checkpoint")
            for name in order:
                runs[name].append(timed(root if name == "cache" else None))
    assert built["source"] == "built" and all(x["source"] == "cache" for x in runs["cache"])
    print(f"Mixtral-shaped: hidden {args.hidden}, {args.layers} layers, 8 experts of ffn {7 * args.hidden // 2}; "
          f"{device.type}, {str(dtype).replace('torch.', '')}; cache build (load + write) {built['wall']:.2f} s")  # fmt: skip
    best = {name: min(x["wall"] for x in xs) for name, xs in runs.items()}
    for name, xs in runs.items():
        walls = ", ".join(f"{x['wall']:.2f}" for x in xs)
        print(
            f"{name:10s}  wall {best[name]:6.2f} s (all: {walls})  "
            f"cpu {min(x['cpu'] for x in xs):6.2f} s  weight bytes read {xs[0]['bytes'] / 2**20:7.2f} MiB"
        )
    cpu = min(x["cpu"] for x in runs["cache"]) / min(x["cpu"] for x in runs["checkpoint"])
    print(f"cache / checkpoint: wall {best['cache'] / best['checkpoint']:.3f}, cpu {cpu:.3f}, bytes "
          f"{runs['cache'][0]['bytes'] / runs['checkpoint'][0]['bytes']:.3f}")  # fmt: skip
    sums = {built["checksum"], *(x["checksum"] for xs in runs.values() for x in xs)}
    print(f"base checksum identical in every load: {len(sums) == 1}")


if __name__ == "__main__":
    main()
