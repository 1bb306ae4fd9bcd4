"""Multi-node launches on one machine: two launchers that each play one node, and the generated SLURM script.

- Two ``accelerate launch --num_machines 2 --machine_rank i`` launchers, one process each, must form ONE 2-rank
  run (the path a real multi-node job takes), not two independent ones.
- The sbatch script from ``qlora-dist slurm`` run with bash under a simulated SLURM: ``SLURM_*`` variables set,
  stand-ins for ``scontrol`` (two hosts, both this machine; ``requeue`` leaves a note) and ``srun`` (runs its
  command once per simulated node, concurrently, with that node's ``SLURM_NODEID``) on PATH. It must train one
  2-rank run and end with DONE; a SIGUSR1 to the batch shell must reach srun as SIGTERM, the run checkpoint
  and leave PREEMPTED, the script call ``scontrol requeue``, and running it again must resume and finish.

Every child process tree is killed when a test fails or times out.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qlora_dist.slurm import PORT_BASE, PORT_SPAN, SlurmJob, sbatch_script

from .conftest import LAUNCH_CONFIGS, REPO, free_port, read_report, run_env, write_run_config

pytestmark = pytest.mark.distributed

RUN_TIMEOUT_S = 180  # one tiny 2-rank run takes 15-30 s on 2 CPU cores
TINY = {"max_steps": 4, "optimizer": "adamw"}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything it started (collected first: torchrun's workers outlive a killed torchrun)."""
    try:
        parent = psutil.Process(proc.pid)
        tree = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=10)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; on timeout kill all the trees and fail."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p)
        raise AssertionError(f"timed out after {timeout} s: {[p.args for p in procs]}") from None


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


# ------------------------------------------------------------------------------------------------------------
# Two launchers, one machine


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_launchers_form_one_two_rank_run(rdzv, tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    """launch_configs/multi_node_ddp.yaml's placeholders (IP, port, 16 processes) are overridden by the flags.

    static: accelerate's default; node 0 hosts the store at main_process_ip:port, the node rank is the machine rank.
    c10d: what the SLURM script uses; which launcher hosts the rendezvous is said with ``is_host`` (on one machine
    both would otherwise take 127.0.0.1 for themselves).
    """
    out = tmp_path / "out"
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, train=TINY, output={"merge": False}
    )
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(2):
            cmd = [sys.executable, "-m", "accelerate.commands.launch"]
            cmd += ["--config_file", str(LAUNCH_CONFIGS / "multi_node_ddp.yaml"), "--num_machines", "2"]
            cmd += ["--machine_rank", str(rank), "--num_processes", "2"]
            cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", rdzv]
            if rdzv == "c10d":
                cmd += ["--rdzv_conf", f"is_host={int(rank == 0)}"]
            cmd += ["-m", "qlora_dist", "train", str(cfg)]
            logs.append(tmp_path / f"launcher{rank}.log")
            with logs[-1].open("w") as log:
                procs.append(
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env(cache_dir), cwd=REPO)
                )
        wait_all(procs, RUN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    detail = "\n".join(
        f"--- launcher {i} (exit {p.returncode}):\n{tail(log)}"
        for i, (p, log) in enumerate(zip(procs, logs, strict=True))
    )
    assert [p.returncode for p in procs] == [0, 0], detail

    report = read_report(out)
    assert report["world_size"] == 2 and report["distributed_type"] == "MULTI_CPU", detail
    assert len(report["lora_checksum_per_rank"]) == 2 and len(set(report["lora_checksum_per_rank"])) == 1
    assert report["base_checksum_after"] == [report["base_checksum_before"]] * 2
    shards = report["data_shards"]
    assert shards["disjoint"] is True and shards["examples_per_rank"] == [16, 16]
    assert report["steps"] == TINY["max_steps"]


# ------------------------------------------------------------------------------------------------------------
# The sbatch script under a simulated SLURM

SRUN_STUB = '''#!{python}
"""Stand-in for srun inside an allocation: the command once per node, concurrently, each with its SLURM_NODEID."""
import os, signal, subprocess, sys, time

args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes = int(opts.get("nodes") or os.environ["SLURM_NNODES"])
procs = [
    subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID="0"))
    for i in range(nodes)
]

def forward(signum, frame):  # srun forwards SIGTERM/SIGINT to every task
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(f"srun got {{signal.Signals(signum).name}}\\n")
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)

signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
killed_at = None
while any(p.poll() is None for p in procs):
    bad = [p for p in procs if p.returncode not in (None, 0)]
    if bad and opts.get("kill-on-bad-exit") == "1" and killed_at is None:
        killed_at = time.monotonic()  # like srun: end the other tasks once one has failed
        for p in procs:
            if p.poll() is None:
                p.terminate()
    if killed_at is not None and time.monotonic() - killed_at > 30:
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.1)
codes = [p.returncode for p in procs]
sys.exit(next((c for c in codes if c != 0), 0) % 256)
'''

SCONTROL_STUB = """#!/bin/bash
# Stand-in for scontrol: two nodes, both this machine; requeue only leaves a note.
case "$1 $2" in
  "show hostnames") printf "localhost\\nlocalhost\\n" ;;
  requeue*) echo "requeue $2" >> "$STUB_LOG" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""


def free_port_in(low: int, high: int) -> int:
    """A TCP port in [low, high) that is free right now."""
    for port in random.sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def write_stubs(folder: Path, srun: str | None = None) -> Path:
    """scontrol and srun stand-ins in ``folder`` (srun: the concurrent one above unless given a bash body)."""
    folder.mkdir(exist_ok=True)
    stubs = {
        "scontrol": SCONTROL_STUB,
        "srun": srun if srun is not None else SRUN_STUB.format(python=sys.executable),
    }
    for name, text in stubs.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def slurm_env(tmp_path: Path, stubs: Path, cache_dir: Path) -> dict[str, str]:
    """The environment of a batch shell in a 2-node allocation with one GPU per node, on this machine."""
    env = {k: v for k, v in run_env(cache_dir).items() if not k.startswith("SLURM_")}
    port = free_port_in(PORT_BASE, PORT_BASE + PORT_SPAN)
    job_id = 5 * PORT_SPAN + (port - PORT_BASE)  # so that the script's port (from the job id) is this free one
    env.update(
        PATH=os.pathsep.join([str(stubs), str(Path(sys.executable).parent), env["PATH"]]),
        SLURM_JOB_ID=str(job_id),
        SLURM_NNODES="2",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="localhost,localhost",
        SLURM_GPUS_ON_NODE="1",
        STUB_LOG=str(tmp_path / "stubs.log"),
    )
    return env


def write_script(tmp_path: Path, cfg: Path) -> Path:
    script = tmp_path / "job.sbatch"
    job = SlurmJob(config=str(cfg), nodes=2, gpus_per_node=1, launch_config=str(LAUNCH_CONFIGS / "multi_gpu_ddp.yaml"))
    script.write_text(sbatch_script(job))
    return script


def start_batch(script: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("a") as f:
        return subprocess.Popen(["bash", str(script)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=script.parent)


def run_batch(script: Path, env: dict[str, str], log: Path, timeout: float = RUN_TIMEOUT_S) -> int:
    proc = start_batch(script, env, log)
    wait_all([proc], timeout)
    return proc.returncode


def wait_for_srun_stub(proc: subprocess.Popen, env: dict[str, str], log: Path, timeout: float = 30) -> None:
    """Until the batch script has started the stand-in srun (it touches ``$STUB_LOG.started``)."""
    deadline = time.monotonic() + timeout
    while not Path(env["STUB_LOG"] + ".started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, tail(log)
        time.sleep(0.05)


def stub_log(env: dict[str, str]) -> str:
    return tail(Path(env["STUB_LOG"]))


def test_sbatch_script_runs_one_two_node_job(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    out = tmp_path / "out"
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, train=TINY, output={"merge": False}
    )
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin"), cache_dir)
    log = tmp_path / "job.log"
    rc = run_batch(write_script(tmp_path, cfg), env, log)
    assert rc == 0, tail(log, 8000)

    text = log.read_text()
    port = PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN
    assert f"on 2 node(s), main localhost:{port}" in text
    assert "node 0 of 2" in text and "node 1 of 2" in text  # each task read its own SLURM_NODEID
    report = read_report(out)
    assert report["world_size"] == 2 and len(set(report["lora_checksum_per_rank"])) == 1
    assert report["data_shards"]["disjoint"] is True
    assert (out / "DONE").is_file() and not (out / "PREEMPTED").exists()
    assert "requeue" not in stub_log(env)
    assert "the run finished (DONE)" in text


def test_usr1_preempts_requeues_and_the_rerun_resumes(tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@S does) -> SIGTERM to srun -> checkpoint + PREEMPTED ->
    scontrol requeue; the requeued job (the same script again) resumes from the checkpoint and finishes."""
    out = tmp_path / "out"
    train = {"max_steps": 40, "micro_batch_size": 2, "optimizer": "adamw", "save_steps": 0}
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, small_alpaca, out, train=train, output={"merge": False}
    )
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin"), cache_dir)
    script, log = write_script(tmp_path, cfg), tmp_path / "job.log"

    proc = start_batch(script, env, log)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, f"the job ended before training:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no training step within {RUN_TIMEOUT_S} s:\n{tail(log)}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # to the batch shell only
        wait_all([proc], RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-8000:]
    assert "srun got SIGTERM" in stub_log(env) and "SIGUSR1" not in stub_log(env)
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and 0 < marker["step"] < train["max_steps"], marker
    assert stub_log(env).count(f"requeue {env['SLURM_JOB_ID']}") == 1
    assert not (out / "DONE").exists()

    # The next allocation: the same script, the same output folder.
    rc = run_batch(script, env, log)
    assert rc == 0, tail(log, 8000)
    report = read_report(out)
    assert report["world_size"] == 2 and report["steps"] == train["max_steps"]
    assert report["resumed_from_step"] == marker["step"], report
    assert (out / "DONE").is_file() and not (out / "PREEMPTED").exists()
    assert stub_log(env).count("requeue") == 1


# Stand-ins for srun alone (no training): what the batch shell does with signals and markers.


def _valid_config(tmp_path: Path) -> Path:
    return write_run_config(tmp_path / "run.yaml", tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "out")


def test_usr1_reaches_srun_as_sigterm_only(tmp_path, cache_dir):
    srun = """#!/bin/bash
trap 'echo "srun got USR1" >> "$STUB_LOG"' USR1
trap 'echo "srun got TERM" >> "$STUB_LOG"; exit 0' TERM
touch "$STUB_LOG.started"
while :; do sleep 0.05; done
"""
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin", srun=srun), cache_dir)
    log = tmp_path / "job.log"
    proc = start_batch(write_script(tmp_path, _valid_config(tmp_path)), env, log)
    try:
        wait_for_srun_stub(proc, env, log)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGUSR1)  # a second warning sends no second SIGTERM
        wait_all([proc], 30)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert stub_log(env).splitlines() == ["srun got TERM"], (stub_log(env), tail(log))
    assert proc.returncode == 0, tail(log)  # srun's status: no marker either way


def test_preempted_marker_requeues_whatever_srun_exits_with(tmp_path, cache_dir):
    srun = '#!/bin/bash\nmkdir -p "$OUT" && echo "{}" > "$OUT/PREEMPTED"\nexit 1  # as torchrun does after a signal\n'
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin", srun=srun), cache_dir)
    env["OUT"] = str(tmp_path / "out")
    log = tmp_path / "job.log"
    rc = run_batch(write_script(tmp_path, _valid_config(tmp_path)), env, log, timeout=30)
    assert rc == 0, tail(log)
    assert stub_log(env).splitlines() == [f"requeue {env['SLURM_JOB_ID']}"]


def test_stale_preempted_marker_does_not_requeue(tmp_path, cache_dir):
    """A marker left by an earlier allocation is removed before srun: a run that then fails early is not requeued
    forever; the script exits with srun's status."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "PREEMPTED").write_text("{}\n")
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin", srun="#!/bin/bash\nexit 3\n"), cache_dir)
    log = tmp_path / "job.log"
    rc = run_batch(write_script(tmp_path, _valid_config(tmp_path)), env, log, timeout=30)
    assert rc == 3, tail(log)
    assert "requeue" not in stub_log(env)
    assert "neither PREEMPTED nor DONE" in log.read_text()


def test_no_requeue_when_slurm_itself_ends_the_job(tmp_path, cache_dir):
    """SIGTERM to the batch shell (scancel, preemption, the time limit): the run still checkpoints (SLURM signals
    the steps), but the script does not requeue a job SLURM is cancelling or requeues itself."""
    srun = """#!/bin/bash
trap 'mkdir -p "$OUT" && echo "{}" > "$OUT/PREEMPTED"; exit 1' TERM
touch "$STUB_LOG.started"
while :; do sleep 0.05; done
"""
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin", srun=srun), cache_dir)
    env["OUT"] = str(tmp_path / "out")
    log = tmp_path / "job.log"
    proc = start_batch(write_script(tmp_path, _valid_config(tmp_path)), env, log)
    try:
        wait_for_srun_stub(proc, env, log)
        # SLURM signals the batch shell and the step; here the test plays both.
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        for child in psutil.Process(proc.pid).children():
            child.terminate()
        wait_all([proc], 30)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0, tail(log)
    assert "requeue" not in stub_log(env) and "not requeueing" in log.read_text()
