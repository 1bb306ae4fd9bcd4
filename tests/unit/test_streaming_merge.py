"""The streaming rank-0 merge (qlora_dist.merge): shard by shard from the base's safetensors files, it must give
the same merged model, bit for bit, as the in-memory path (the NF4 model dequantized, the unquantized base loaded,
peft's ``merge_and_unload``), for the dequantized and the original base, float32 and bfloat16, with and without
double quantization, on tiny Llama and Qwen2 models and on a base saved in several bfloat16 shards; while its
peak memory stays near one shard plus the adapter and the in-memory path's grows with the whole model.

Every model and adapter here is a real folder on disk, written by transformers and peft.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from benchmarks import merge as bench_merge
from qlora_dist import merge as merge_mod
from qlora_dist import model as model_mod
from qlora_dist.cli import main as cli_main
from qlora_dist.config import LoraConfig, ModelConfig, QuantConfig

CPU = torch.device("cpu")
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(scope="module")
def sharded_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 3-layer Llama saved in bfloat16 as several safetensors shards with an index (a checkpoint like the hub's)."""
    from qlora_dist.tiny import build_tiny_model

    scratch = tmp_path_factory.mktemp("llama_fp32")
    build_tiny_model(scratch, tiny_tokenizer, arch="llama", layers=3, seed=5)
    out = tmp_path_factory.mktemp("llama_sharded")
    model = AutoModelForCausalLM.from_pretrained(scratch, dtype=BF16)
    model.save_pretrained(out, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(out)
    assert (out / merge_mod.SAFE_INDEX).is_file() and len(list(out.glob("*.safetensors"))) >= 3
    return out


ARCH_FIXTURES = {"llama": "tiny_llama_dir", "qwen2": "tiny_qwen2_dir", "sharded": "sharded_llama_dir"}


class Trained:
    """A QLoRA model as a run leaves it: NF4 base + LoRA with random non-zero B, saved as a peft adapter."""

    def __init__(self, base_dir: Path, quant: QuantConfig, compute: torch.dtype, folder: Path) -> None:
        self.base_dir, self.quant, self.compute = base_dir, quant, compute
        base = model_mod.load_quantized_model(ModelConfig(name_or_path=str(base_dir)), quant, CPU, compute)
        torch.manual_seed(0)
        self.model = model_mod.attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        self.model.eval()
        self.adapter_dir = folder / "adapter"
        self.model.save_pretrained(self.adapter_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(self.adapter_dir)
        meta = {"quant": dataclasses.asdict(quant), "compute_dtype": str(compute).replace("torch.", "")}
        (self.adapter_dir / merge_mod.QUANT_META).write_text(json.dumps(meta))

    def nf4(self, from_model: bool = True) -> merge_mod.NF4Rebuild:
        return merge_mod.NF4Rebuild.of(self.quant, self.compute, CPU, self.model if from_model else None)

    def in_memory(self, merge_base: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The in-memory path as the run took it: the trained model's own 4-bit weights, dequantized."""
        dequantized = merge_mod.dequantized_base_weights(self.model, dtype) if merge_base == "dequantized" else None
        base = merge_mod.load_merge_base(str(self.base_dir), dtype, dequantized)
        return merge_mod.merge_adapter(base, self.adapter_dir).state_dict()


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """``trained(arch, double_quant, compute, storage)`` -> a cached :class:`Trained`."""
    cache: dict[tuple, Trained] = {}

    def get(arch: str, double_quant: bool = True, compute: torch.dtype = F32, storage: str = "uint8") -> Trained:
        key = (arch, double_quant, compute, storage)
        if key not in cache:
            base_dir = request.getfixturevalue(ARCH_FIXTURES.get(arch, f"tiny_{arch}_dir"))
            quant = QuantConfig(double_quant=double_quant, storage_dtype=storage)
            cache[key] = Trained(base_dir, quant, compute, tmp_path_factory.mktemp(f"trained_{arch}"))
        return cache[key]

    return get


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_bit_identical(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def stream(t: Trained, merge_base: str, dtype: torch.dtype, out: Path, nf4=None, **kwargs) -> dict:
    spec = (nf4 or t.nf4()) if merge_base == "dequantized" else None
    report = merge_mod.merge_trained(t.adapter_dir, spec, str(t.base_dir), out, dtype, None, [], [], **kwargs)
    return report


# -- bit for bit ----------------------------------------------------------------------------------------------

MATRIX = [
    pytest.param(arch, "dequantized", dtype, dq, id=f"{arch}-dequantized-{str(dtype)[6:]}-dq{int(dq)}")
    for arch in ARCH_FIXTURES
    for dtype in (F32, BF16)
    for dq in (True, False)
] + [
    pytest.param(arch, "original", dtype, True, id=f"{arch}-original-{str(dtype)[6:]}")
    for arch in ARCH_FIXTURES
    for dtype in (F32, BF16)
]


@pytest.mark.parametrize(("arch", "merge_base", "dtype", "double_quant"), MATRIX)
def test_streaming_equals_in_memory_bit_for_bit(trained, tmp_path, arch, merge_base, dtype, double_quant):
    """Compute dtype = merge dtype here (a bf16 run merges in bf16); the base weights go through the same NF4
    round trip the adapter saw during training, and the delta through peft's arithmetic."""
    t = trained(arch, double_quant, compute=dtype)
    report = stream(t, merge_base, dtype, tmp_path / "merged")
    assert report["method"] == "streaming" and report["base"] == merge_base
    assert_bit_identical(t.in_memory(merge_base, dtype), folder_tensors(tmp_path / "merged"))


@pytest.mark.parametrize("arch", ["llama", "sharded", "gpt2"])  # gpt2: Conv1D weights, stored (in, out)
def test_streaming_from_the_quantize_once_cache_is_bit_identical(trained, tmp_path, arch):
    """With the run's quantize-once cache the merge dequantizes its packed weights instead of quantizing the
    checkpoint again: every 4-bit weight comes from the cache, and the output is the same, bit for bit."""
    from qlora_dist import base_cache
    from qlora_dist import model as model_mod
    from qlora_dist.config import ModelConfig

    t = trained(arch)

    def load(path: str):
        return model_mod.load_quantized_model(ModelConfig(name_or_path=path), t.quant, CPU, t.compute)

    _, how = base_cache.load_base(load, str(t.base_dir), t.base_dir, t.quant, t.compute, CPU, tmp_path / "cache",
                                  True, lambda: None)  # fmt: skip
    assert how.source == "built"
    nf4 = dataclasses.replace(t.nf4(), cache=Path(how.cache_dir))
    (tmp_path / "merged").mkdir()
    counts = merge_mod.stream_merge(str(t.base_dir), t.adapter_dir, tmp_path / "merged", t.compute, nf4)
    assert counts["from_cache"] == counts["quantized"] > 0
    assert_bit_identical(t.in_memory("dequantized", t.compute), folder_tensors(tmp_path / "merged"))


@pytest.mark.parametrize("arch", ["llama", "sharded"])
def test_float32_compute_merged_in_bfloat16(trained, tmp_path, arch):
    """Dequantized in float32 (the compute dtype), cast to bfloat16 on the CPU, then the delta added: both ways."""
    t = trained(arch, compute=F32)
    stream(t, "dequantized", BF16, tmp_path / "merged")
    assert_bit_identical(t.in_memory("dequantized", BF16), folder_tensors(tmp_path / "merged"))


def test_zero3_storage_dtype(trained, tmp_path):
    """ZeRO-3 stores the packed 4-bit weights in the compute dtype: the rebuilt base is the same."""
    t = trained("qwen2", compute=BF16, storage="bfloat16")
    assert t.nf4().storage_dtype == BF16
    stream(t, "dequantized", BF16, tmp_path / "merged")
    assert_bit_identical(t.in_memory("dequantized", BF16), folder_tensors(tmp_path / "merged"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "sharded"])
def test_quantized_layers_from_config_match_the_trained_model(trained, tmp_path, arch):
    """The standalone merge has no trained model: it derives the 4-bit layers from config.json on the meta
    device. They are exactly the trained model's Linear4bit layers (every linear but the head)."""
    t = trained(arch)
    from_model = t.nf4(from_model=True).layers
    from_config = merge_mod.quantized_weights_of_config(AutoConfig.from_pretrained(t.base_dir), t.nf4(False))
    assert from_model == from_config and "lm_head.weight" not in from_config
    assert len(from_config) == 7 * AutoConfig.from_pretrained(t.base_dir).num_hidden_layers
    stream(t, "dequantized", F32, tmp_path / "merged", nf4=t.nf4(from_model=False))
    assert_bit_identical(t.in_memory("dequantized", F32), folder_tensors(tmp_path / "merged"))


def test_bfloat16_adapter_weights(trained, tmp_path):
    """peft upcasts bfloat16 adapter weights to float32 before merging; so does the streaming merge."""
    t = trained("llama", compute=BF16)
    adapter = tmp_path / "adapter_bf16"
    shutil.copytree(t.adapter_dir, adapter)
    weights = adapter / merge_mod.ADAPTER_WEIGHTS
    save_file({k: v.to(BF16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    nf4 = t.nf4()
    merge_mod.merge_trained(adapter, nf4, str(t.base_dir), tmp_path / "merged", BF16, None, [], [])
    deq = merge_mod.dequantized_base_weights(t.model, BF16)
    expected = merge_mod.merge_adapter(merge_mod.load_merge_base(str(t.base_dir), BF16, deq), adapter).state_dict()
    assert_bit_identical(expected, folder_tensors(tmp_path / "merged"))


# -- the merged folder ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "sharded"])
def test_merged_folder_is_a_plain_transformers_model(trained, tmp_path, tiny_tokenizer, arch):
    t = trained(arch)
    batches = [torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reference = merge_mod.logits_of(t.model, batches)
    out = tmp_path / "merged"
    report = merge_mod.merge_trained(
        t.adapter_dir, t.nf4(), str(t.base_dir), out, F32, tiny_tokenizer, batches, reference
    )
    assert report["method"] == "streaming" and report["checked_sequences"] == 3
    assert report["rel_logit_error"] is not None and report["rel_logit_error"] < 1e-4
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= files
    if arch == "sharded":  # the shards mirror the base's, with an index
        assert {p.name for p in t.base_dir.glob("*.safetensors")} == {n for n in files if n.endswith(".safetensors")}
        index = json.loads((out / merge_mod.SAFE_INDEX).read_text())
        assert set(index["weight_map"]) == set(folder_tensors(out))
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in folder_tensors(out).values()
        )
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no .tmp or .old left beside it

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no peft, no bitsandbytes
    assert type(merged).__name__.lower().startswith(arch if arch != "sharded" else "llama")
    assert merged.dtype == F32 and AutoConfig.from_pretrained(out).dtype == F32
    got = merge_mod.logits_of(merged.eval(), batches)
    assert merge_mod.relative_error(reference, got) < 1e-4
    base = AutoModelForCausalLM.from_pretrained(t.base_dir, dtype=F32).eval()
    assert merge_mod.relative_error(reference, merge_mod.logits_of(base, batches)) > 1e-2  # the adapter matters


def test_config_matches_the_in_memory_save(trained, tmp_path):
    t = trained("sharded")
    stream(t, "dequantized", BF16, tmp_path / "streamed")
    merged = merge_mod.merge_adapter(merge_mod.load_merge_base(str(t.base_dir), BF16, None), t.adapter_dir)
    merge_mod.save_atomically(merged, None, tmp_path / "saved")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == json.loads(
            (tmp_path / "saved" / name).read_text()
        )


def test_unsupported_adapter_falls_back_to_in_memory(trained, tmp_path):
    """An adapter config with a rank pattern (here equal to r, so the result must not change) is not streamed:
    the in-memory path merges it, with the same bits."""
    t = trained("llama")
    adapter = tmp_path / "adapter_pattern"
    shutil.copytree(t.adapter_dir, adapter)
    config = json.loads((adapter / merge_mod.ADAPTER_CONFIG).read_text())
    config["rank_pattern"] = {"q_proj": 8}
    (adapter / merge_mod.ADAPTER_CONFIG).write_text(json.dumps(config))
    assert "rank_pattern" in merge_mod.streaming_blocker(str(t.base_dir), adapter)
    report = merge_mod.merge_trained(adapter, t.nf4(), str(t.base_dir), tmp_path / "merged", F32, None, [], [])
    assert report["method"] == "in-memory"
    assert_bit_identical(t.in_memory("dequantized", F32), folder_tensors(tmp_path / "merged"))


def test_non_safetensors_base_falls_back_to_in_memory(trained, tmp_path):
    t = trained("llama")
    base = tmp_path / "base_bin"
    shutil.copytree(t.base_dir, base)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    assert "no safetensors" in merge_mod.streaming_blocker(str(base), t.adapter_dir)
    report = merge_mod.merge_trained(t.adapter_dir, None, str(base), tmp_path / "merged", F32, None, [], [])
    assert report["method"] == "in-memory"
    assert_bit_identical(t.in_memory("original", F32), folder_tensors(tmp_path / "merged"))


def test_a_failed_merge_leaves_no_folder_and_keeps_the_old_one(trained, tmp_path, monkeypatch):
    t = trained("sharded")
    out = tmp_path / "merged"
    stream(t, "dequantized", F32, out)
    before = folder_tensors(out)
    calls = []

    def explode(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:  # some tensors and shards are already written
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = merge_mod._merged_tensor
    monkeypatch.setattr(merge_mod, "_merged_tensor", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        stream(t, "original", F32, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert_bit_identical(before, folder_tensors(out))


# -- the command ------------------------------------------------------------------------------------------------


def test_cli_merge_streams_and_matches_the_training_merge(trained, tmp_path):
    """``qlora-dist merge`` rebuilds the dequantized base from the settings recorded beside the adapter
    (double quantization off here, bf16 compute) and gives the training run's in-memory merge, bit for bit,
    in the base checkpoint's own dtype (float32 here) by default."""
    t = trained("qwen2", double_quant=False, compute=BF16)
    out = tmp_path / "merged"
    args = ["merge", "--base", str(t.base_dir), "--adapter", str(t.adapter_dir), "--out", str(out)]
    assert cli_main(args) == 0
    assert_bit_identical(t.in_memory("dequantized", F32), folder_tensors(out))
    assert (out / "tokenizer_config.json").is_file() and not (tmp_path / "merged.tmp").exists()

    original = tmp_path / "original"
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_dist", "merge", "--base", str(t.base_dir), "--adapter", str(t.adapter_dir),
         "--out", str(original), "--merge-base", "original", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "streaming" in proc.stderr
    assert_bit_identical(t.in_memory("original", F32), folder_tensors(original))


def test_merge_dtype_defaults_to_the_base_checkpoints_own(trained, tmp_path, tiny_llama_dir):
    """A bfloat16 base trained with float32 compute (the CPU's) merges to bfloat16, the size of the base, both
    from ``qlora-dist merge`` and from a run's ``merge_dtype: auto``; an explicit ``--dtype`` still wins."""
    t = trained("sharded", compute=F32)
    assert merge_mod.checkpoint_dtype(str(t.base_dir)) == BF16
    assert merge_mod.checkpoint_dtype(str(tiny_llama_dir)) == F32
    out = tmp_path / "merged"
    assert cli_main(["merge", "--base", str(t.base_dir), "--adapter", str(t.adapter_dir), "--out", str(out)]) == 0
    tensors = folder_tensors(out)
    assert {v.dtype for v in tensors.values()} == {BF16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    base_bytes = sum(f.stat().st_size for f in t.base_dir.glob("*.safetensors"))
    assert abs(sum(f.stat().st_size for f in out.glob("*.safetensors")) - base_bytes) < 0.01 * base_bytes
    assert_bit_identical(t.in_memory("dequantized", BF16), tensors)

    from qlora_dist.config import from_dict
    from qlora_dist.plugin import QLoRAPlugin

    raw = {"model": {"name_or_path": str(t.base_dir)}, "data": {"path": str(tmp_path / "unused.jsonl")}}
    plugin = QLoRAPlugin(from_dict(raw))
    assert plugin._merge_dtype(CPU) == BF16
    plugin.config.output.merge_dtype = "float32"
    assert plugin._merge_dtype(CPU) == F32


def test_cli_merge_missing_adapter_exits_2(tiny_llama_dir, tmp_path, capsys):
    missing = tmp_path / "no_adapter"
    out = tmp_path / "out"
    assert cli_main(["merge", "--base", str(tiny_llama_dir), "--adapter", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora-dist: error: --adapter") and str(missing) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_merge_names_the_flag_of_a_bad_base_or_out(tiny_llama_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / merge_mod.ADAPTER_CONFIG).write_text("{}")
    assert cli_main(["merge", "--base", str(tmp_path / "nope"), "--adapter", str(adapter), "--out", "x"]) == 2
    assert "--base" in capsys.readouterr().err
    taken = tmp_path / "taken.txt"
    taken.write_text("keep")
    assert cli_main(["merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(taken)]) == 2
    assert "--out" in capsys.readouterr().err and taken.read_text() == "keep"


# -- memory, and the benchmark that measures it ------------------------------------------------------------------


def test_benchmark_small_measures_memory_and_writes_its_section(tmp_path):
    """``python -m benchmarks.merge --small``, end to end: a 42 MB bfloat16 Llama in 4 MB shards, each method
    in a fresh process (peak RSS reset after imports and a warm-up merge). Streaming stays under the largest shard
    + the adapter + a fixed margin; the in-memory path needs more than the whole model; the outputs are equal."""
    md, raw = tmp_path / "BENCHMARKS.md", tmp_path / "merge.json"
    md.write_text("# Benchmarks\n\n## Training\n\nkept as it is\n")
    args = ["--small", "--workdir", str(tmp_path / "work"), "--output", str(md), "--json", str(raw)]
    assert bench_merge.main(args) == 0
    measured = json.loads(raw.read_text())
    base, results = measured["base"], measured["results"]
    assert measured["identical"] and base["shards"] >= 10 and base["largest_shard_bytes"] < base["bytes"] / 8
    assert [len(results[m]) for m in bench_merge.METHODS] == [1, 1]
    peak = {m: results[m][0]["peak_above_baseline_bytes"] for m in bench_merge.METHODS}
    if None in peak.values():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    margin = 32 * 2**20  # interpreter, allocator, and a few temporary copies of the tensor being merged
    assert peak["streaming"] < base["largest_shard_bytes"] + measured["adapter_bytes"] + margin, peak
    assert peak["in-memory"] > base["bytes"], peak
    assert peak["streaming"] * 2 < peak["in-memory"], peak

    text = md.read_text()
    assert "## Training\n\nkept as it is" in text and text.count("## Merge") == 1
    assert "bit-identical (every tensor, `torch.equal`): **yes**" in text
    assert "| **in-memory / streaming** |" in text
    # Writing again replaces its own section and nothing else.
    bench_merge.write_section(md, "## Merge\n\nreplaced\n")
    assert md.read_text() == "# Benchmarks\n\n## Training\n\nkept as it is\n\n## Merge\n\nreplaced\n"
