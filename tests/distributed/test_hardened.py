"""Hardened runs, with real launchers, real files and real signals: one run per output folder, nothing deleted
on doubt, no pickle from a checkpoint (DDP and ZeRO-2), fast failure when one rank fails.

One 2-rank DDP run serves several tests (module fixture): a second run is refused while it trains, and its
checkpoints then get a planted pickle payload that a resume must refuse without running it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_dist import checkpoint
from qlora_dist.checkpoint import _write_manifest

from .conftest import LAUNCH_CONFIGS, REPO, free_port, launch, read_report, run_env, write_run_config

pytestmark = pytest.mark.distributed

TRAIN = {"max_steps": 60, "micro_batch_size": 2, "optimizer": "adamw", "save_steps": 10, "lr_scheduler": "constant"}
OUTPUT = {"merge": False}


class Payload:
    """Pickles to "create this file": the code a planted checkpoint file would run when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(ckpt: Path, name: str, marker: Path) -> None:
    """Replace ``ckpt/name`` by a torch file holding the payload and rewrite the manifest to match (the
    manifest proves integrity, not origin)."""
    target = ckpt / name
    target.unlink()
    torch.save({"state": Payload(marker)}, target)
    (ckpt / checkpoint.MANIFEST).unlink()
    _write_manifest(ckpt)
    assert checkpoint.verify(ckpt) is not None and not marker.exists()


def forget_finish(out: Path) -> None:
    """As if the run had been killed right after its last checkpoint: no report, no DONE."""
    (out / "run_report.json").unlink()
    (out / checkpoint.DONE).unlink()


def popen_launch(args: list[str], cache_dir: Path, launch_config: str = "multi_gpu_ddp.yaml", n: int = 2, env=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / launch_config)]
    cmd += ["--num_processes", str(n), "--main_process_port", str(free_port()), *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**run_env(cache_dir), **(env or {})},
        cwd=REPO,
    )  # fmt: skip


def cli(args: list[str], cache_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = run_env(cache_dir)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "qlora_dist", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("qlora-dist: error")]


@pytest.fixture(scope="module")
def contested(tmp_path_factory, tiny_llama_dir, small_alpaca, cache_dir):
    """A 2-rank run, and a second run started on its folder while it trains (what the second one printed)."""
    tmp = tmp_path_factory.mktemp("contested")
    out = tmp / "out"
    cfg = write_run_config(tmp / "run.yaml", tiny_llama_dir, small_alpaca, out, train=TRAIN, output=OUTPUT)
    first = popen_launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.05)
        started = time.perf_counter()
        second = cli(["train", str(cfg)], cache_dir)
        second_seconds = time.perf_counter() - started
        first_running_after = first.poll() is None
        first_log, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_log[-4000:]
    return {"out": out, "cfg": cfg, "second": second, "second_seconds": second_seconds,
            "first_running_after": first_running_after, "first_log": first_log}  # fmt: skip


def test_second_run_on_a_folder_is_refused_and_the_first_completes(contested):
    second = contested["second"]
    lines = error_lines(second.stderr)
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert str(contested["out"]) in lines[0] and "in use by another run" in lines[0]
    assert "host " in lines[0] and "pid " in lines[0]
    # Refused while the first still trained, and before the second loaded anything (a folder that exists is
    # locked first thing).
    assert contested["first_running_after"] and contested["second_seconds"] < 30
    report = read_report(contested["out"])
    assert report["world_size"] == 2 and report["steps"] == TRAIN["max_steps"]
    rows = [json.loads(line) for line in (contested["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, TRAIN["max_steps"] + 1))
    assert contested["first_log"].count("checkpoint") >= 1


def test_planted_pickle_in_a_ddp_checkpoint_never_runs(contested, tmp_path, cache_dir):
    """The newest checkpoint's optimizer.pt replaced by a payload (manifest rewritten): the resume refuses to
    unpickle it, moves that checkpoint aside, resumes from the one before and ends where the run ended."""
    out, cfg = contested["out"], contested["cfg"]
    newest = out / "checkpoints" / f"step-{TRAIN['max_steps']}"
    reference = load_file(newest / "adapter" / "adapter_model.safetensors")
    marker = tmp_path / "PWNED"
    plant_payload(newest, "optimizer.pt", marker)
    forget_finish(out)
    proc = launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    log = proc.stdout + proc.stderr
    assert not marker.exists(), "the planted pickle ran"
    aside = out / "checkpoints" / checkpoint.UNUSABLE / newest.name
    assert aside.is_dir() and "refused to unpickle" in (aside / checkpoint.REASON).read_text()
    assert log.count("is unusable") == 1  # decided (and said) once, by rank 0
    report = read_report(out)
    assert report["world_size"] == 2 and report["resumed_from_step"] == TRAIN["max_steps"] - TRAIN["save_steps"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in reference:
        assert torch.equal(adapter[key], reference[key]), key  # the resumed run ended bit for bit where it had


SLOW = pytest.mark.skipif(
    not os.environ.get("QLORA_DIST_SLOW_TESTS"), reason="ZeRO-3 resume: set QLORA_DIST_SLOW_TESTS=1 (2 more launches)"
)


@pytest.mark.parametrize("stage", ["zero2", pytest.param("zero3", marks=SLOW)])
def test_zero_checkpoint_holds_no_pickle_and_resumes_exactly(stage, tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    """ZeRO-2 (and ZeRO-3 with QLORA_DIST_SLOW_TESTS=1): the optimizer state is the project's own plain-tensor files (no DeepSpeed checkpoint, which
    DeepSpeed would unpickle); a payload planted in one is never run, and resuming from the checkpoint before
    reproduces the run bit for bit."""
    out = tmp_path / "out"
    train = {**TRAIN, "max_steps": 4, "save_steps": 2}
    cfg = write_run_config(tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, train=train, output=OUTPUT)
    args = ["-m", "qlora_dist", "train", str(cfg)]
    launch(args, cache_dir, f"deepspeed_{stage}.yaml")
    newest = out / "checkpoints" / "step-4"
    assert sorted(p.name for p in (newest / "zero").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    assert not (newest / "deepspeed").exists()
    reference = load_file(newest / "adapter" / "adapter_model.safetensors")
    marker = tmp_path / "PWNED"
    plant_payload(newest, "zero/rank-1.pt", marker)
    forget_finish(out)
    launch(args, cache_dir, f"deepspeed_{stage}.yaml")
    assert not marker.exists(), "the planted pickle ran"
    report = read_report(out)
    assert report["world_size"] == 2 and report["strategy"] == stage and report["resumed_from_step"] == 2
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in reference:
        assert torch.equal(adapter[key], reference[key]), key
    assert (out / "checkpoints" / checkpoint.UNUSABLE / "step-4" / checkpoint.REASON).is_file()


def test_a_failing_rank_ends_the_job_with_one_line_naming_it(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    """Rank 1 fails inside the loop (a callback raises): rank 0 leaves with one line naming rank 1, not a gloo
    traceback."""
    (tmp_path / "failing_callback.py").write_text(
        "from qlora_dist.errors import UserError\n"
        "class FailOnRank1:\n"
        "    def on_step_end(self, event):\n"
        "        if event.rank == 1 and event.step == 3:\n"
        "            raise UserError('planted failure on rank 1')\n"
    )
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, tmp_path / "out", output=OUTPUT,
        train={**TRAIN, "max_steps": 8, "callbacks": ["failing_callback:FailOnRank1"]},
    )  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = popen_launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir, env=env)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "qlora-dist: error [rank 1]: planted failure on rank 1" in log, log[-4000:]
    peer = [line for line in log.splitlines() if "rank 1 failed" in line]  # (tqdm may share the line)
    assert len(peer) == 1 and "qlora-dist: error: rank 1 failed: this rank stopped too" in peer[0], log[-4000:]
    assert "pair.cc" not in log and "DistBackendError" not in log, log[-4000:]  # no gloo traceback


def test_a_preflight_error_ends_a_two_process_launch_within_seconds(tmp_path, tiny_llama_dir, cache_dir):
    """Rank 0's preflight refuses a bad row; rank 1, waiting for it in the process group, is stopped by the
    launcher's SIGTERM at once (it used to ignore it until torchrun's SIGKILL 30 s later).

    Measured from the error line to the launcher's exit, so the (machine-dependent) start-up does not count."""
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(8)] + [{"instruction": "Say nothing."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_run_config(tmp_path / "run.yaml", tiny_llama_dir, data, tmp_path / "out", output=OUTPUT)
    proc = popen_launch(["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    lines, error_at = [], None
    for line in proc.stdout:  # line by line, as they come
        lines.append(line)
        if error_at is None and line.startswith("qlora-dist: error") and "line 9" in line:
            error_at = time.perf_counter()
    proc.wait(timeout=300)
    after_error = time.perf_counter() - (error_at or 0)
    log = "".join(lines)
    assert proc.returncode != 0 and error_at is not None, log[-3000:]
    assert len([line for line in error_lines(log) if "line 9" in line]) == 1
    assert "stopping at the end of this optimizer step" not in log  # no misleading preemption message
    assert "received SIGTERM during start-up" in log and "exitcode  : 143" in log  # rank 1 left on the SIGTERM
    assert after_error < 15, after_error  # torchrun's 30 s grace did not run out


def test_sigterm_during_start_up_exits_promptly(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    """Before the loop, SIGTERM ends the process at once (status 143), leaving no PREEMPTED marker."""
    out = tmp_path / "out"
    cfg = write_run_config(tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, output=OUTPUT, train=TRAIN)
    env = run_env(cache_dir)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_dist", "train", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (out / ".qlora-dist.lock").is_file():  # taken before the data and the weights load
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
            time.sleep(0.02)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
        took = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and took < 5, (proc.returncode, took, log[-2000:])
    assert "received SIGTERM during" in log and not (out / checkpoint.PREEMPTED).exists()
