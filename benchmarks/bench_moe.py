"""NF4 mixture-of-experts against the unquantized-experts path, measured in one invocation.

    PYTHONPATH=. python benchmarks/bench_moe.py [--hidden 256] [--layers 4] [--steps 6] [--repeats 2]

Builds a Mixtral-shaped model locally (8 experts, top-2, ffn = 3.5 x hidden; random weights, nothing
downloaded) and trains LoRA on it two ways, same data, same steps, on this machine's device:

- ``nf4``: qlora_dist's path: attention in bitsandbytes 4-bit, experts in NF4 per expert
  (``qlora_dist.quant.moe``), per-expert LoRA on ``gate_up_proj``/``down_proj`` and the attention linears.
- ``reference``: what a QLoRA run held before: attention in 4-bit, experts left unquantized in the compute
  dtype by bitsandbytes' loading, transformers' stock experts forward, and peft's own ``target_parameters``
  LoRA (``ParamWrapper``) on the same expert matrices plus the attention linears.

Prints the frozen base's bytes (what one DDP rank holds) against the fp32 model, and training tokens/s of each
path with the ratio. LoRA dropout is 0 in both (peft's ``ParamWrapper`` refuses anything else). The repeats
alternate the two paths so neither always runs first.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch


def build(model_dir: Path, hidden: int, layers: int) -> int:
    from qlora_dist.tiny import build_tiny_model, demo_texts, train_tokenizer

    tokenizer = train_tokenizer(demo_texts(), model_dir)
    model = build_tiny_model(model_dir, tokenizer, arch="mixtral", hidden_size=hidden, layers=layers)
    return sum(p.numel() * 4 for p in model.parameters())


def load(model_dir: Path, nf4: bool, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from qlora_dist import model as model_mod
    from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig
    from qlora_dist.quant import moe

    cfg, quant = ModelConfig(name_or_path=str(model_dir)), QuantConfig(storage_dtype="uint8")
    if nf4:
        base = model_mod.load_quantized_model(cfg, quant, device, dtype)
        torch.manual_seed(0)
        return model_mod.attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
    real = moe.quantize_experts
    moe.quantize_experts = lambda *args, **kwargs: []  # the load as it was before: experts left as they load
    try:
        base = model_mod.load_quantized_model(cfg, quant, device, dtype)
    finally:
        moe.quantize_experts = real
    peft_cfg = PeftLoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    with moe.without_peft_moe_remap():
        return get_peft_model(base, peft_cfg)


def tokens_per_second(model, device, steps: int, batch: int, length: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        ids = torch.randint(5, 500, (batch, length), generator=gen).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch * length / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from qlora_dist import model as model_mod

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(None):
        folder = Path(tmp) / "mixtral"
        fp32 = build(folder, args.hidden, args.layers)
        models = {name: load(folder, name == "nf4", device, dtype) for name in ("nf4", "reference")}
        base = {name: model_mod.local_base_bytes(m) for name, m in models.items()}
        speed: dict[str, list[float]] = {name: [] for name in models}
        for r in range(args.repeats):
            order = ("nf4", "reference") if r % 2 == 0 else ("reference", "nf4")
            for name in order:
                speed[name].append(tokens_per_second(models[name], device, args.steps, args.batch, args.length))
    print(f"Mixtral-shaped: hidden {args.hidden}, {args.layers} layers, 8 experts of ffn {7 * args.hidden // 2}, "
          f"top-2; {device.type}, {str(dtype).replace('torch.', '')}; batch {args.batch} x {args.length}")  # fmt: skip
    print(f"fp32 model: {fp32 / 2**20:.2f} MiB")
    for name in models:
        best = max(speed[name])
        print(
            f"{name:9s}  frozen base {base[name] / 2**20:7.2f} MiB ({base[name] / fp32:.3f} of fp32)  "
            f"train {best:8.0f} tokens/s (best of {args.repeats}: {', '.join(f'{s:.0f}' for s in speed[name])})"
        )
    print(f"nf4 / reference: base bytes {base['nf4'] / base['reference']:.3f}, "
          f"tokens/s {max(speed['nf4']) / max(speed['reference']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
