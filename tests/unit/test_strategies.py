"""Strategy resolution from the launch environment, and the combinations refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_dist.config import load_config
from qlora_dist.errors import ConfigError
from qlora_dist.model import check_model_path
from qlora_dist.strategies import resolve_strategy

BASE = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}


def deepspeed_env(monkeypatch, stage: int, init: bool = True, offload_param: str = "none", offload_opt: str = "none"):
    """What `accelerate launch --config_file launch_configs/deepspeed_*.yaml` exports to each worker."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", str(init).lower())
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", offload_param)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", offload_opt)
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_plain_launch_is_ddp_or_single(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    strategy = resolve_strategy(load_config(base=BASE))
    assert strategy.name == "ddp" and strategy.device_map(torch.device("cpu")) == {"": torch.device("cpu")}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_strategy(load_config(base=BASE, overrides=["train.strategy=ddp"])).name == "single"


def test_zero3_settings_follow_from_the_strategy(monkeypatch):
    deepspeed_env(monkeypatch, 3)
    strategy = resolve_strategy(load_config(base=BASE))
    assert strategy.name == "zero3" and strategy.shards_parameters
    assert strategy.device_map(torch.device("cpu")) is None  # deepspeed.initialize partitions the 4-bit base
    assert strategy.storage_dtype(load_config(base=BASE), torch.bfloat16) == "bfloat16"
    assert strategy.accelerator_kwargs(cpu=True) == {"cpu": False}  # cpu=True would drop DeepSpeed
    assert strategy.optimizer_name("paged_adamw_8bit") == "paged_adamw_8bit"


def test_offload_replaces_the_optimizer(monkeypatch):
    deepspeed_env(monkeypatch, 3, offload_param="cpu", offload_opt="cpu")
    assert resolve_strategy(load_config(base=BASE)).optimizer_name("adamw_8bit") == "deepspeed_cpu_adam"


@pytest.mark.parametrize(
    ("stage", "env", "overrides", "message"),
    [
        (3, {}, ["quant.storage_dtype=uint8"], "quant.storage_dtype=uint8 cannot be partitioned by ZeRO-3"),
        (3, {}, ["quant.storage_dtype=float16", "quant.compute_dtype=bfloat16"], "differs from quant.compute_dtype"),
        (3, {"init": False}, [], "zero3_init_flag: true"),
        (1, {}, [], "ZeRO stage 1 is not supported"),
        (2, {"offload_param": "cpu"}, [], "offload_param_device needs ZeRO-3"),
        (2, {}, ["train.strategy=zero3"], "train.strategy=zero3 but the launch config gives zero2"),
        (3, {}, ["train.strategy=ddp"], "train.strategy=ddp but the launch config gives zero3"),
    ],
)
def test_known_bad_combinations_are_refused(monkeypatch, stage, env, overrides, message):
    deepspeed_env(monkeypatch, stage, **env)
    with pytest.raises(ConfigError, match=message):
        resolve_strategy(load_config(base=BASE, overrides=overrides))


def test_the_nearest_good_config_passes(monkeypatch):
    deepspeed_env(monkeypatch, 3)
    resolve_strategy(load_config(base=BASE, overrides=["quant.storage_dtype=bfloat16", "quant.compute_dtype=bfloat16"]))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_prequantized_checkpoints_are_refused(tmp_path, method):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": {"quant_method": method}})
    )
    with pytest.raises(ConfigError, match=f"pre-quantized with {method}.*unquantized"):
        check_model_path(load_config(base={**BASE, "model": {"name_or_path": str(tmp_path)}}).model)


def test_comm_clock_counts_overlapping_collectives_once():
    from qlora_dist.distributed import CommClock

    ticks = iter([0.0, 1.0, 3.0, 10.0, 10.5])
    clock = CommClock(now=lambda: next(ticks))
    clock.start()  # t=0: first in flight
    clock.start()  # overlaps: no new reading
    clock.stop()  # one still in flight
    clock.stop()  # t=1: idle again -> 1 s, not the 2 s a sum of the two would give
    clock.start()  # t=3
    clock.stop()  # t=10 -> 7 s more
    assert clock.total() == 8.0
    assert CommClock(measured=False).total() is None


def test_comm_clock_stops_when_an_async_collective_completes():
    from qlora_dist.distributed import CommClock

    ticks = iter([2.0, 5.0])
    clock = CommClock(now=lambda: next(ticks))
    clock.start()
    future = torch.futures.Future()
    chained = clock.after(future)
    assert clock.total() == 0.0  # issued, not done
    future.set_result(torch.ones(3))
    assert torch.equal(chained.wait(), torch.ones(3)) and clock.total() == 3.0
