"""Preemption and exact resume, with real signals sent to real launchers.

The signal goes to ``accelerate launch`` (as SLURM's srun would deliver it); torchrun forwards SIGTERM to the
workers, which agree to stop at the next optimizer step, save a checkpoint, leave ``PREEMPTED`` and exit.
torchrun itself exits 1 after a signal whatever the workers did, so nothing here reads its exit code: the
markers and the files decide.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qlora_dist import checkpoint

from .conftest import LAUNCH_CONFIGS, REPO, free_port, launch, read_report, run_env, write_run_config

pytestmark = pytest.mark.distributed

# Dropout on, so the per-rank RNG state must be restored too; plain AdamW so the comparison is bit for bit.
TRAIN = {"max_steps": 40, "micro_batch_size": 2, "optimizer": "adamw", "save_steps": 0}
LORA = {"dropout": 0.1}


def start(cfg, cache_dir, num_processes=2, launch_config="multi_gpu_ddp.yaml") -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH_CONFIGS / launch_config),
    ]
    cmd += [
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
        "-m",
        "qlora_dist",
        "train",
        str(cfg),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env(cache_dir), cwd=REPO
    )


def preempt(cfg, out, cache_dir, signals=(signal.SIGTERM,), num_processes=2, launch_config="multi_gpu_ddp.yaml") -> str:
    """Start a run, wait until it trains, send ``signals`` to the launcher; returns the launcher's output."""
    proc = start(cfg, cache_dir, num_processes, launch_config)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.time() < deadline, "the run ended or hung before training"
            time.sleep(0.05)
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / checkpoint.PREEMPTED).is_file(), f"the run was not preempted:\n{output[-3000:]}"
    return output


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir, small_alpaca, cache_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_run_config(
        tmp / "run.yaml", tiny_llama_dir, small_alpaca, tmp / "out", train=TRAIN, lora=LORA, output={"merge": False}
    )
    launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    return tmp / "out"


def test_preempted_then_resumed_equals_uninterrupted(tmp_path, uninterrupted, tiny_llama_dir, small_alpaca, cache_dir):
    out = tmp_path / "out"
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, train=TRAIN, lora=LORA, output={"merge": False}
    )
    # Two signals: the second one lands while the first is being handled or the checkpoint written.
    log = preempt(cfg, out, cache_dir, signals=(signal.SIGTERM, signal.SIGTERM))
    marker = json.loads((out / checkpoint.PREEMPTED).read_text())
    assert marker["signal"] == "SIGTERM" and 0 < marker["step"] < TRAIN["max_steps"]
    assert log.count("stopping at the end of this optimizer step") >= 2  # both ranks got it
    saved = checkpoint.find_resumable(out / "checkpoints")
    assert saved is not None and saved.name == f"step-{marker['step']}" and checkpoint.verify(saved) is None
    assert not (out / "run_report.json").exists() and not (out / "merged").exists()  # no merge on preemption

    launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir)  # the same command resumes
    report = read_report(out)
    assert report["world_size"] == 2 and report["resumed_from_step"] == marker["step"]
    assert report["steps"] == TRAIN["max_steps"]
    assert (out / checkpoint.DONE).is_file() and not (out / checkpoint.PREEMPTED).exists()
    a, b = adapter(out), adapter(uninterrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit: fp32 on CPU, same data, same RNG
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, TRAIN["max_steps"] + 1))


def test_resume_on_fewer_processes_continues_from_the_same_sample_position(
    tmp_path, tiny_llama_dir, small_alpaca, cache_dir
):
    out = tmp_path / "out"
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, train={**TRAIN, "optimizer": "paged_adamw_8bit"},
        output={"merge": False},
    )  # fmt: skip
    preempt(cfg, out, cache_dir)
    state = checkpoint.read_state(checkpoint.find_resumable(out / "checkpoints"))
    assert state.world_size == 2 and state.epoch_position == state.step * 2 * TRAIN["micro_batch_size"]
    proc = launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir, launch_config="single_gpu.yaml", num_processes=1)
    assert f"continuing from global sample position {state.epoch_position}" in proc.stdout + proc.stderr
    report = read_report(out)
    assert report["world_size"] == 1 and report["steps"] == TRAIN["max_steps"]
    # This session's first epoch took exactly the examples after that position (and the other process's
    # random streams and shard bookkeeping restarted, as the log said).
    assert report["data_shards"]["examples_per_rank"] == [report["num_examples"] - state.epoch_position]
    assert report["data_shards"]["disjoint"]


def test_single_process_sigint_checkpoints_and_corrupt_newest_is_skipped(
    tmp_path, tiny_llama_dir, small_alpaca, cache_dir
):
    """Ctrl-C on a single-process run saves; a corrupted newest checkpoint falls back to the previous one."""
    out = tmp_path / "out"
    train = {**TRAIN, "save_steps": 2, "max_steps": 400}
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, train=train, output={"merge": False}
    )
    cmd = [sys.executable, "-m", "qlora_dist", "train", str(cfg)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env(cache_dir), cwd=REPO
    )
    try:
        deadline = time.time() + 240
        while len(list((out / "checkpoints").glob("step-*"))) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and (out / checkpoint.PREEMPTED).is_file()
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert len(steps) == 2  # output.keep_checkpoints=2: older ones pruned after the new one was complete
    newest, previous = (out / "checkpoints" / f"step-{s}" for s in (steps[1], steps[0]))
    # Corrupt the newest (flip bytes of its optimizer state) and leave an incomplete save behind.
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    (out / "checkpoints" / ".tmp-step-999").mkdir()
    assert "optimizer.pt does not match its checksum" in checkpoint.verify(newest)
    assert checkpoint.find_resumable(out / "checkpoints") == previous

    resumed = subprocess.run(
        cmd + ["train.max_steps=" + str(steps[1] + 2)], capture_output=True, text=True, timeout=300,
        env=run_env(cache_dir), cwd=REPO,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint {newest} is unusable" in resumed.stderr
    assert read_report(out)["resumed_from_step"] == steps[0]
    assert not (out / "checkpoints" / ".tmp-step-999").exists()
