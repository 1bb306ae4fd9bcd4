"""Multi-node launches on one machine: two launchers that each play one node, and the generated SLURM script.

- Two ``accelerate launch --num_machines 2 --machine_rank i`` launchers, one process each, must form ONE 2-rank
  run (the path a real multi-node job takes), not two independent ones.
- The batch shell's logic in the script from ``qlora-dist slurm``, run with bash under stand-ins: ``SLURM_*``
  variables set; ``scontrol`` (nodes n1 and n2 at 127.0.0.1; ``requeue`` leaves a note), ``scancel`` (signals
  the stand-in srun's tasks, never the batch shell) and ``srun`` (its command once per simulated node,
  concurrently, with that node's ``SLURM_NODEID``; SIGKILLs its tasks on SIGTERM, as real srun does) on PATH.
  The stand-in srun is held to real srun's behaviour by the same probe test_slurm_real.py runs on the real one.
  Training under the script, its preemption, requeue and resume are tested on a real SLURM in test_slurm_real.py;
  what is left here is what a real SLURM cannot show cheaply.

Every child process tree is killed when a test fails or times out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qlora_dist.slurm import STARTUP_STOP, SlurmJob, sbatch_script

from .conftest import LAUNCH_CONFIGS, REPO, free_port, read_report, run_env, write_run_config
from .slurm_cluster import assert_probe, wait_probe_started, write_probe

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
    assert (
        shards["disjoint"] is True and sum(shards["examples_per_rank"]) == 32 and min(shards["examples_per_rank"]) > 0
    )
    assert report["steps"] == TINY["max_steps"]


# ------------------------------------------------------------------------------------------------------------
# The batch shell's own logic, under stand-ins for srun, scancel and scontrol. The real thing (training, signals,
# requeues, resume) is in test_slurm_real.py; these check what a real SLURM cannot show cheaply: a second
# warning, a marker from an earlier allocation, srun's exit status against the markers.

SRUN_STUB = '''#!{python}
"""Stand-in for srun inside an allocation: the command once per node, concurrently, each with its SLURM_NODEID.

Like real srun it does not pass SIGTERM on: it answers it by SIGKILLing every task ("forcing job termination").
The tasks' PIDs go to $STUB_LOG.tasks, where the scancel stand-in finds the job's steps.
"""
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
with open(os.environ["STUB_LOG"] + ".tasks", "w") as f:
    f.write(" ".join(str(p.pid) for p in procs))

def log(line):
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(line + "\\n")

def force_termination(signum, frame):
    log(f"srun got {{signal.Signals(signum).name}}: forcing job termination")
    for p in procs:
        if p.poll() is None:
            p.kill()

signal.signal(signal.SIGTERM, force_termination)
signal.signal(signal.SIGUSR1, lambda signum, frame: log("srun got SIGUSR1"))
open(os.environ["STUB_LOG"] + ".started", "w").close()
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
    time.sleep(0.05)
codes = [p.returncode for p in procs]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c != 0), 0) % 256)
'''

SCANCEL_STUB = """#!/bin/bash
# Stand-in for scancel: notes the call; --signal=SIG without --batch/--full signals the job's steps (the tasks of
# the srun stand-in), never the batch shell, as SLURM does.
echo "scancel $*" >> "$STUB_LOG"
sig=""
for arg in "$@"; do
  case "$arg" in --signal=*) sig=${arg#--signal=} ;; --batch | --full | -b | -f) exit 0 ;; esac
done
if [ -n "$sig" ] && [ -f "$STUB_LOG.tasks" ]; then kill -s "$sig" $(cat "$STUB_LOG.tasks") 2>/dev/null; fi
exit 0
"""

SCONTROL_STUB = """#!/bin/bash
# Stand-in for scontrol: two nodes, n1 and n2, both this machine at 127.0.0.1; requeue only leaves a note.
case "$1 $2" in
  "show hostnames") printf "n1\\nn2\\n" ;;
  "show node") echo "NodeName=n1 Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 NodeHostName=localhost" ;;
  requeue*) echo "requeue $2" >> "$STUB_LOG" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""

SQUEUE_STUB = """#!/bin/bash
# Stand-in for squeue -s: one step (the srun stand-in's) once it has started.
if [ -f "$STUB_LOG.started" ]; then echo "$SLURM_JOB_ID.0"; fi
"""


def write_stubs(folder: Path, srun: str | None = None) -> Path:
    """scontrol, scancel, squeue and srun stand-ins in ``folder`` (srun: the one above unless given a body)."""
    folder.mkdir(exist_ok=True)
    stubs = {
        "scontrol": SCONTROL_STUB,
        "scancel": SCANCEL_STUB,
        "squeue": SQUEUE_STUB,
        "srun": srun if srun is not None else SRUN_STUB.format(python=sys.executable),
    }
    for name, text in stubs.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def slurm_env(tmp_path: Path, stubs: Path, cache_dir: Path) -> dict[str, str]:
    """The environment of a batch shell in a 2-node allocation on this machine."""
    env = {k: v for k, v in run_env(cache_dir).items() if not k.startswith("SLURM_")}
    env.update(
        PATH=os.pathsep.join([str(stubs), str(Path(sys.executable).parent), env["PATH"]]),
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="n[1-2]",
        STUB_LOG=str(tmp_path / "stubs.log"),
    )
    return env


def write_script(tmp_path: Path, cfg: Path) -> Path:
    script = tmp_path / "job.sbatch"
    job = SlurmJob(config=str(cfg), nodes=2, gpus_per_node=0, launch_config=str(LAUNCH_CONFIGS / "multi_gpu_ddp.yaml"))
    script.write_text(sbatch_script(job))
    return script


def start_batch(script: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("a") as f:
        return subprocess.Popen(["bash", str(script)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=script.parent)


def run_batch(script: Path, env: dict[str, str], log: Path, timeout: float = 30) -> int:
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


def _valid_config(tmp_path: Path) -> Path:
    return write_run_config(tmp_path / "run.yaml", tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "out")


@pytest.mark.parametrize("how", ["kill srun", "scancel --signal=TERM"])
def test_stand_in_srun_answers_signals_as_real_srun_does(how, tmp_path, cache_dir):
    """The probe test_slurm_real.py runs on real srun: SIGTERM to srun SIGKILLs the tasks; scancel --signal=TERM
    reaches them and leaves srun and the batch shell alone."""
    probe = tmp_path / "probe"
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin"), cache_dir)
    env["PROBE"] = str(probe)
    log = tmp_path / "probe.out"
    proc = start_batch(write_probe(probe, sys.executable), env, log)
    try:
        srun_pid = wait_probe_started(probe, timeout=30)
        if how == "kill srun":
            os.kill(srun_pid, signal.SIGTERM)
        else:
            subprocess.run(["scancel", "--signal=TERM", env["SLURM_JOB_ID"]], env=env, check=True, timeout=10)
        assert_probe(probe, how)
        wait_all([proc], 30)
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def _warn_a_running_job(tmp_path: Path, cache_dir, on_term: str, warnings: int) -> tuple[subprocess.Popen, dict, Path]:
    """Run the batch script over node tasks that answer SIGTERM with ``on_term`` (shell code); once both are
    running, send the batch shell ``warnings`` SIGUSR1s (what ``--signal=B:USR1@S`` sends) and wait for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    task = f"#!/bin/bash\ntrap '{on_term}' TERM\n"
    task += 'echo "task $SLURM_NODEID ready" >> "$STUB_LOG"\nwhile :; do sleep 0.05; done\n'
    (bin_dir / "accelerate").write_text(task)  # what each node's task execs
    (bin_dir / "accelerate").chmod(0o755)
    env = slurm_env(tmp_path, write_stubs(bin_dir), cache_dir)
    log = tmp_path / "job.log"
    proc = start_batch(write_script(tmp_path, _valid_config(tmp_path)), env, log)
    try:
        deadline = time.monotonic() + 30
        while stub_log(env).count("ready") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, tail(log)
            time.sleep(0.05)
        for i in range(warnings):
            time.sleep(0.3 if i else 0)
            os.kill(proc.pid, signal.SIGUSR1)
        wait_all([proc], 30)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return proc, env, log


def test_usr1_becomes_one_sigterm_to_the_steps(tmp_path, cache_dir):
    """Each task gets SIGTERM once, through scancel; srun itself gets no signal; a second warning sends nothing.
    The main address is the first node's NodeAddr, not its name."""
    proc, env, log = _warn_a_running_job(
        tmp_path, cache_dir, 'echo "task $SLURM_NODEID got TERM" >> "$STUB_LOG"; exit 0', 2
    )
    lines = stub_log(env).splitlines()
    assert lines.count(f"scancel --signal=TERM {env['SLURM_JOB_ID']}") == 1, (lines, tail(log))
    assert sorted(line for line in lines if "got" in line) == ["task 0 got TERM", "task 1 got TERM"], lines
    # The tasks exited without a marker (as a run still loading its base does): requeued once, noted.
    assert lines.count(f"requeue {env['SLURM_JOB_ID']}") == 1, (lines, tail(log))
    assert proc.returncode == 0, tail(log)
    assert (tmp_path / "out" / STARTUP_STOP).is_file(), tail(log)
    text = log.read_text()
    assert "main n1 at 127.0.0.1:" in text and "node 0 of 2" in text and "node 1 of 2" in text, text


def test_a_second_warning_outside_the_loop_in_a_row_is_not_requeued(tmp_path, cache_dir):
    """The previous allocation was also stopped before the training loop: an allocation too short ever to
    reach it would requeue forever, so the script stops and says why."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / STARTUP_STOP).write_text("")
    proc, env, log = _warn_a_running_job(tmp_path, cache_dir, "exit 143", 1)
    assert proc.returncode == 1, tail(log)
    assert f"requeue {env['SLURM_JOB_ID']}" not in stub_log(env), stub_log(env)
    assert "as in the previous allocation: not requeueing" in log.read_text(), tail(log)
    assert not (tmp_path / "out" / STARTUP_STOP).exists()


def test_preempted_marker_requeues_whatever_srun_exits_with(tmp_path, cache_dir):
    srun = '#!/bin/bash\nmkdir -p "$OUT" && echo "{}" > "$OUT/PREEMPTED"\nexit 1  # as torchrun does after a signal\n'
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin", srun=srun), cache_dir)
    env["OUT"] = str(tmp_path / "out")
    log = tmp_path / "job.log"
    rc = run_batch(write_script(tmp_path, _valid_config(tmp_path)), env, log)
    assert rc == 0, tail(log)
    assert stub_log(env).splitlines() == [f"requeue {env['SLURM_JOB_ID']}"]


def test_stale_preempted_marker_does_not_requeue(tmp_path, cache_dir):
    """A marker left by an earlier allocation is removed before srun: a run that then fails early is not requeued
    forever; the script exits with srun's status."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "PREEMPTED").write_text("{}\n")
    env = slurm_env(tmp_path, write_stubs(tmp_path / "bin", srun="#!/bin/bash\nexit 3\n"), cache_dir)
    log = tmp_path / "job.log"
    rc = run_batch(write_script(tmp_path, _valid_config(tmp_path)), env, log)
    assert rc == 3, tail(log)
    assert "requeue" not in stub_log(env)
    assert "neither PREEMPTED nor DONE" in log.read_text()
