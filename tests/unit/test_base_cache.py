"""Quantize once per machine (qlora_dist.base_cache): the cached packed NF4 base is the base quantized on load,
byte for byte, and a changed base or changed quant settings build a new one.

One process here (the cache's barrier is a no-op); the 2-rank use (rank 0 builds, rank 1 loads) is checked in
tests/distributed/test_ddp.py through the run report.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from qlora_dist import base_cache
from qlora_dist import model as model_mod
from qlora_dist.config import ModelConfig, QuantConfig
from qlora_dist.loss import token_loss_sum

CPU = torch.device("cpu")


def loader(quant: QuantConfig, compute=torch.float32, device=CPU):
    def load(path: str):
        return model_mod.load_quantized_model(ModelConfig(name_or_path=path), quant, device, compute)

    return load


def cached(model_dir, root, quant=None, compute=torch.float32, device=CPU):
    quant = quant or QuantConfig()
    return base_cache.load_base(loader(quant, compute, device), str(model_dir), model_dir, quant, compute, device, root,
                                True, lambda: None)  # fmt: skip


@pytest.fixture
def base_dir(tmp_path, tiny_llama_dir):
    """A private copy of the tiny Llama (the test rewrites its files)."""
    return shutil.copytree(tiny_llama_dir, tmp_path / "base")


def test_cache_is_bit_identical_to_quantizing_on_load(base_dir, tmp_path, tiny_tokenizer):
    root = tmp_path / "cache"
    quant = QuantConfig(storage_dtype="uint8")
    direct = loader(quant)(str(base_dir))
    built, first = cached(base_dir, root, quant)
    loaded, second = cached(base_dir, root, quant)
    assert (first.source, second.source) == ("built", "cache") and first.cache_dir == second.cache_dir
    folders = list(root.iterdir())
    assert len(folders) == 1 and (folders[0] / base_cache.COMPLETE).is_file()  # no temporary folder left
    assert second.file_bytes == sum(f.stat().st_size for f in folders[0].glob("*.safetensors")) > 0
    assert second.seconds > 0 and (second.disk_read_bytes is None or second.disk_read_bytes >= 0)

    checksum = model_mod.base_checksum(direct)
    assert model_mod.base_checksum(built) == checksum == model_mod.base_checksum(loaded)
    # The cache folder holds 4-bit layers, not a dequantized copy.
    import bitsandbytes as bnb

    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in direct.modules())
    assert n4 > 0 and sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules()) == n4
    # It stands for the base checkpoint (what a saved adapter records), not the cache folder.
    assert loaded.name_or_path == str(base_dir)
    # Same training: LoRA on either base gives the same loss and gradients.
    from qlora_dist.config import LoraConfig

    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    results = []
    for base in (direct, loaded):
        torch.manual_seed(0)
        peft_model = model_mod.attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        value = token_loss_sum(peft_model, batch)
        value.backward()
        results.append((value.detach(), [p.grad for p in peft_model.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_changed_settings_or_base_build_a_new_cache(base_dir, tmp_path):
    root = tmp_path / "cache"
    _, a = cached(base_dir, root)
    _, same = cached(base_dir, root)
    _, other_quant = cached(base_dir, root, QuantConfig(double_quant=False))
    _, other_compute = cached(base_dir, root, compute=torch.bfloat16)
    assert same.source == "cache" and same.cache_dir == a.cache_dir
    assert other_quant.source == other_compute.source == "built"
    assert len({a.cache_dir, other_quant.cache_dir, other_compute.cache_dir}) == 3

    # A new checkpoint in the same folder (here: the same bytes, rewritten; real ones differ in content too).
    weights = base_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    model, rebuilt = cached(base_dir, root)
    assert rebuilt.source == "built" and rebuilt.cache_dir != a.cache_dir


def test_an_unfinished_cache_folder_is_rebuilt(base_dir, tmp_path):
    root = tmp_path / "cache"
    _, a = cached(base_dir, root)
    (root / os.path.basename(a.cache_dir) / base_cache.COMPLETE).unlink()  # as if the build had crashed
    _, again = cached(base_dir, root)
    assert again.source == "built" and again.cache_dir == a.cache_dir


def test_no_cache_root_loads_the_checkpoint(base_dir):
    model, how = cached(base_dir, None)
    assert how.source == "checkpoint" and how.cache_dir is None
    assert how.file_bytes == (base_dir / "model.safetensors").stat().st_size


def test_quant_settings_are_in_the_key(base_dir):
    keys = {
        base_cache.cache_key(base_dir, q, c, CPU)
        for q in (QuantConfig(), QuantConfig(quant_type="fp4"), QuantConfig(storage_dtype="float32"))
        for c in (torch.float32, torch.bfloat16)
    }
    assert len(keys) == 6
    assert (
        base_cache.cache_key(base_dir, dataclasses.replace(QuantConfig(), cache_dir="/x"), torch.float32, CPU) in keys
    )


def test_an_unwritable_cache_folder_only_costs_the_quantization(base_dir, tmp_path):
    root = tmp_path / "not_a_folder"
    root.write_text("a file where the cache folder should be")  # writing under it fails (OSError), even as root
    model, how = cached(base_dir, root)
    assert how.source == "checkpoint" and how.cache_dir is None and root.is_file()
    assert model_mod.base_checksum(model) == model_mod.base_checksum(loader(QuantConfig())(str(base_dir)))


# -- mixture-of-experts bases: the NF4 experts (quant/moe.py) travel in files of their own -----------------


def one_step(base) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and LoRA gradients of one training step (LoRA on the attention and on every expert; B nonzero)."""
    from qlora_dist.config import LoraConfig

    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(0)
    peft_model = model_mod.attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    for i, (name, p) in enumerate(sorted(peft_model.named_parameters())):
        if "lora_B" in name or name.endswith("_B"):
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(i))
    value = token_loss_sum(peft_model, batch)
    value.backward()
    return value.detach(), [p.grad for _, p in sorted(peft_model.named_parameters()) if p.requires_grad]


@pytest.mark.parametrize("arch", ["tiny_mixtral_dir", "tiny_qwen3_moe_dir"])
def test_moe_cache_restores_the_nf4_experts_bit_identical(arch, request, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from qlora_dist.quant import moe

    base_dir = shutil.copytree(request.getfixturevalue(arch), tmp_path / "base")
    root = tmp_path / "cache"
    quant = QuantConfig(storage_dtype="uint8")
    direct = loader(quant)(str(base_dir))
    # On cpu:0, as accelerate names a CPU rank's device (safetensors calls it "cpu").
    built, first = cached(base_dir, root, quant, device=torch.device("cpu", 0))
    loaded, second = cached(base_dir, root, quant, device=torch.device("cpu", 0))
    assert (first.source, second.source) == ("built", "cache") and first.reason is second.reason is None

    # One file per experts module, holding 4-bit packed matrices (not a dequantized copy), counted in the bytes.
    folder = root / os.path.basename(second.cache_dir)
    names = [n for n, _ in moe.fused_experts(model_mod.meta_model(ModelConfig(name_or_path=str(base_dir))))]
    files = sorted(folder.glob(f"{moe.EXPERTS_FILE_PREFIX}*.safetensors"))
    assert [f.name for f in files] == sorted(f"{moe.EXPERTS_FILE_PREFIX}{n}.safetensors" for n in names)
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_tensor(f"{names[0]}.gate_up_proj").dtype == torch.uint8
    assert second.file_bytes == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    # The main checkpoint of the cache holds no expert weights (they would be 16-bit there).
    assert not [k for k in load_file(folder / "model.safetensors") if ".experts." in k]

    reference = [m for m in direct.modules() if isinstance(m, moe.NF4Experts)]
    for model in (built, loaded):
        experts = [m for m in model.modules() if isinstance(m, moe.NF4Experts)]
        assert len(experts) == len(names) == len(reference) and not moe.fused_experts(model)
        assert not [m for m in model.modules() if isinstance(m, moe.ExpertsSlot)]
        for got, want in zip(experts, reference, strict=True):
            assert (got.source_class, type(got.act_fn), got.compute_dtype, got.num_experts) == (
                want.source_class, type(want.act_fn), want.compute_dtype, want.num_experts,
            )  # fmt: skip
    checksum = model_mod.base_checksum(direct)
    assert model_mod.base_checksum(built) == checksum == model_mod.base_checksum(loaded)
    assert loaded.name_or_path == str(base_dir)

    # Same training step on either base: the same loss and LoRA gradients, bit for bit.
    (loss_a, grads_a), (loss_b, grads_b) = one_step(direct), one_step(loaded)
    assert torch.equal(loss_a, loss_b) and len(grads_a) == len(grads_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert any(".lora_experts." in n for n, p in loaded.named_parameters() if p.requires_grad)


def test_moe_cache_is_rebuilt_when_the_base_or_settings_change(tiny_mixtral_dir, tmp_path):
    base_dir = shutil.copytree(tiny_mixtral_dir, tmp_path / "base")
    root = tmp_path / "cache"
    _, a = cached(base_dir, root)
    _, other_quant = cached(base_dir, root, QuantConfig(quant_type="fp4"))
    assert other_quant.source == "built" and other_quant.cache_dir != a.cache_dir
    loaded, again = cached(base_dir, root, QuantConfig(quant_type="fp4"))
    assert again.source == "cache"
    assert model_mod.base_checksum(loaded) == model_mod.base_checksum(
        loader(QuantConfig(quant_type="fp4"))(str(base_dir))
    )
    weights = base_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, rebuilt = cached(base_dir, root)
    assert rebuilt.source == "built" and rebuilt.cache_dir not in (a.cache_dir, other_quant.cache_dir)


def test_moe_cache_with_missing_expert_files_is_refused(tiny_mixtral_dir, tmp_path):
    from qlora_dist.quant import moe

    root = tmp_path / "cache"
    _, a = cached(tiny_mixtral_dir, root)
    victim = sorted((root / os.path.basename(a.cache_dir)).glob(f"{moe.EXPERTS_FILE_PREFIX}*"))[0]
    victim.unlink()  # a damaged cache is a loud error, never a model with random or missing experts
    with pytest.raises(RuntimeError, match="delete the folder to rebuild it"):
        cached(tiny_mixtral_dir, root)
    # The experts class of the modeling module is put back after the failed load.
    from transformers.models.mixtral import modeling_mixtral

    assert not issubclass(modeling_mixtral.MixtralExperts, moe.ExpertsSlot)


def test_a_base_partitioned_while_it_loaded_is_not_cached(base_dir, tmp_path):
    """A guard for a later transformers that builds a quantized model under zero.Init (5.24 never does, see
    base_cache's docstring): a partitioned parameter (DeepSpeed marks it with ``ds_id``) must not be saved,
    since save_pretrained would write the placeholders of the other ranks' shards."""
    quant = QuantConfig()

    def partitioned_load(path: str):
        model = loader(quant)(path)
        next(model.parameters()).ds_id = 0
        return model

    root = tmp_path / "cache"
    model, how = base_cache.load_base(partitioned_load, str(base_dir), base_dir, quant, torch.float32, CPU, root, True,
                                      lambda: None)  # fmt: skip
    assert how.source == "checkpoint" and how.cache_dir is None and "zero.Init" in how.reason
    assert not any(root.glob(f"*/{base_cache.COMPLETE}"))


def test_the_report_says_why_the_cache_was_not_used(base_dir):
    _, off = base_cache.load_base(loader(QuantConfig()), str(base_dir), base_dir, QuantConfig(), torch.float32, CPU,
                                  None, True, lambda: None, "quant.cache is false")  # fmt: skip
    assert (off.source, off.reason) == ("checkpoint", "quant.cache is false")
    assert base_cache.report(off)["reason"] == "quant.cache is false"


def test_a_damaged_cache_is_refused_by_its_recorded_checksum(base_dir, tmp_path):
    """The builder records the checksum of what it quantized; a later load whose bytes differ (one packed byte
    flipped on disk here) is refused, naming the folder, rather than trained on."""
    import json

    from safetensors.torch import load_file, save_file

    from qlora_dist.errors import UserError

    root, quant = tmp_path / "cache", QuantConfig(storage_dtype="uint8")
    built, first = cached(base_dir, root, quant)
    folder = root / next(p.name for p in root.iterdir())
    recorded = json.loads((folder / base_cache.COMPLETE).read_text())["checksum"]
    assert recorded == model_mod.base_checksum(built)
    loaded, second = cached(base_dir, root, quant)
    base_cache.verify(second, model_mod.base_checksum(loaded))  # intact: passes

    file = folder / "model.safetensors"
    tensors = load_file(file)
    name = next(k for k, t in tensors.items() if t.dtype == torch.uint8 and k.endswith("q_proj.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] ^= 0xFF
    save_file(tensors, file, metadata={"format": "pt"})
    damaged, third = cached(base_dir, root, quant)
    assert third.source == "cache"
    with pytest.raises(UserError, match=f"cached in {folder}.*damaged"):
        base_cache.verify(third, model_mod.base_checksum(damaged))
