"""The generated sbatch script on a real SLURM: munged, slurmctld and two slurmd (n1, n2) on this machine.

See ``slurm_cluster.py`` for the cluster. The script is generated for CPU nodes (``--gpus-per-node 0``, one
process per node) and submitted with sbatch; every check reads what SLURM and the run left behind:

- what the design rests on, shown on real srun with a task that traps SIGTERM: SIGTERM to srun SIGKILLs the tasks
  (their handler never runs), while ``scancel --signal=TERM JOB`` reaches the tasks and spares the batch shell;
- an uninterrupted 2-node job: COMPLETED, one 2-rank run (world size 2), DONE, main address from NodeAddr;
- one job stopped three ways in turn, each mid-run: the script's own warning (``scancel --batch --signal=USR1``,
  what ``--signal=B:USR1@S`` sends), so the script checkpoints and requeues it; ``scontrol requeue``; preemption
  by a job in a higher-priority partition (``PreemptMode=REQUEUE``). It resumes each time, finishes with
  Restarts >= 3, and its adapter equals the uninterrupted job's bit for bit;
- ``scancel``: the run checkpoints and leaves PREEMPTED, the job ends CANCELLED and is not requeued.

SLURM is installed from Debian's packages when missing (root with apt-get). Where it cannot be, the tests skip
and say why, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_dist.checkpoint import checkpoints_dir
from qlora_dist.slurm import SlurmJob, sbatch_script

from .conftest import LAUNCH_CONFIGS, read_report, run_env, write_run_config
from .slurm_cluster import SlurmCluster, ensure_slurm

pytestmark = pytest.mark.distributed

JOB_TIMEOUT_S = 240
# Plain AdamW, fp32 on CPU: bit-exact resume. Enough steps that three stops can each land mid-run; a
# checkpoint every 10 steps on top of the ones the stops take. log_steps 1: metrics.jsonl shows every step.
TRAIN = {"max_steps": 40, "micro_batch_size": 2, "optimizer": "adamw", "save_steps": 10, "log_steps": 1}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the real-SLURM tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        _unavailable("the real-SLURM tests run slurmd, which needs root")
    reason = ensure_slurm()
    if reason is not None:
        _unavailable(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield c.start()
    finally:
        c.stop()


def job_env(cache_dir: Path) -> dict[str, str]:
    """What the jobs need on every node: this Python's accelerate and qlora_dist (sbatch exports it all)."""
    env = run_env(cache_dir)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def write_job(folder: Path, tiny_llama_dir: Path, data: Path, name: str) -> tuple[Path, Path]:
    """A run config and its generated CPU script in ``folder``; returns (script, output dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "out"
    cfg = write_run_config(folder / "run.yaml", tiny_llama_dir, data, out, train=TRAIN, output={"merge": False})
    job = SlurmJob(
        config=str(cfg),
        nodes=2,
        gpus_per_node=0,
        launch_config=str(LAUNCH_CONFIGS / "multi_gpu_ddp.yaml"),
        job_name=name,
        log_dir=str(folder),
    )
    script = folder / "job.sbatch"
    script.write_text(sbatch_script(job))
    return script, out


def job_logs(folder: Path, name: str, job_id: str) -> tuple[str, str]:
    """The job's .out and .err, appended to across its requeues."""

    def read(ext: str) -> str:
        path = folder / f"{name}-{job_id}.{ext}"
        return path.read_text(errors="replace") if path.is_file() else ""

    return read("out"), read("err")


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_training(cluster: SlurmCluster, job_id: str, out: Path, restarts: int) -> int:
    """Until the job's allocation number ``restarts`` runs and has logged an optimizer step of its own; returns
    the last step the earlier allocations logged (0 for the first)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    before = None
    while True:
        info = cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), info
        assert int(info["Restarts"]) <= restarts, info
        if info["JobState"] == "RUNNING" and int(info["Restarts"]) == restarts:
            if before is None:  # the earlier allocation has ended: what it logged is all it will log
                before = steps_logged(out) if restarts else 0
            if steps_logged(out) > before:
                return before
        assert time.monotonic() < deadline, f"job {job_id}: allocation {restarts} not training: {info}"
        time.sleep(0.2)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, tiny_llama_dir, small_alpaca, cache_dir):
    """One job that runs to the end. Submitted with the next test's job, it runs beside it (one CPU of each node
    each) while that one waits out its requeues; the test after checks it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    script, out = write_job(folder, tiny_llama_dir, small_alpaca, "whole")
    job_id = cluster.submit(script, job_env(cache_dir))
    return folder, out, job_id


def test_stopped_three_ways_resumes_to_the_same_adapter(
    cluster, uninterrupted, tmp_path, tiny_llama_dir, small_alpaca, cache_dir
):
    folder = tmp_path / "stopped"
    script, out = write_job(folder, tiny_llama_dir, small_alpaca, "stopped")
    job_id = cluster.submit(script, job_env(cache_dir))

    # 1. The script's own warning: USR1 to the batch shell only, as --signal=B:USR1@S sends it.
    wait_training(cluster, job_id, out, restarts=0)
    cluster.client("scancel", "--batch", "--signal=USR1", job_id)
    # 2. SLURM requeues it itself: SIGTERM to the batch shell and the steps.
    wait_training(cluster, job_id, out, restarts=1)
    cluster.client("scontrol", "requeue", job_id)
    # 3. A job in the higher-priority partition needs both nodes: PreemptMode=REQUEUE.
    wait_training(cluster, job_id, out, restarts=2)
    whole_folder, whole_out, whole_id = uninterrupted
    whole = cluster.wait_finished(whole_id, JOB_TIMEOUT_S)  # or it would be preempted too
    assert steps_logged(out) < TRAIN["max_steps"], "the stopped job finished before it could be preempted"
    high = folder / "high.sbatch"
    high.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --partition=high\n#SBATCH --output=/dev/null\ntrue\n")
    high_id = cluster.submit(high, job_env(cache_dir))

    info = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    stdout, stderr = job_logs(folder, "stopped", job_id)
    detail = f"{info}\n{stdout[-4000:]}\n{stderr[-6000:]}"
    assert cluster.wait_finished(high_id, 60)["JobState"] == "COMPLETED"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", detail
    assert int(info["Restarts"]) >= 3, detail

    # Each stop checkpointed at a step boundary with SIGTERM (never USR1, which torchrun dies of), and resumed
    # from that step.
    stops = [int(s) for s in re.findall(r"preempted by SIGTERM at step (\d+)", stderr)]
    assert len(stops) == 3 and stops == sorted(stops) and stops[0] > 0 and stops[-1] < TRAIN["max_steps"], detail
    assert "received SIGUSR1" not in stderr, detail
    assert stderr.count("SIGUSR1: SIGTERM to the steps of job") == 1, detail
    assert stdout.count(f"requeueing job {job_id}") == 1, detail  # the USR1 stop; SLURM requeued the others
    assert stderr.count("not requeueing it from here") == 2, detail
    report = read_report(out)
    assert report["world_size"] == 2 and report["steps"] == TRAIN["max_steps"], detail
    assert report["resumed_from_step"] == stops[-1], detail
    assert (out / "DONE").is_file() and not (out / "PREEMPTED").exists()

    # Bit for bit the adapter of the job that was never stopped.
    assert whole["JobState"] == "COMPLETED" and whole["Restarts"] == "0", whole
    a, b = adapter(out), adapter(whole_out)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_uninterrupted_job_is_one_two_rank_run(cluster, uninterrupted):
    folder, out, job_id = uninterrupted
    info = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    stdout, stderr = job_logs(folder, "whole", job_id)
    detail = f"{info}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", detail
    assert info["NodeList"] == "n[1-2]", detail
    # The node names are not host names: the rendezvous address is n1's NodeAddr.
    assert re.search(r"main n1 at 127\.0\.0\.1:\d+", stdout), detail
    assert "node 0 of 2" in stdout and "node 1 of 2" in stdout, detail  # each task read its own SLURM_NODEID
    report = read_report(out)
    assert report["world_size"] == 2 and report["distributed_type"] == "MULTI_CPU", detail
    assert len(set(report["lora_checksum_per_rank"])) == 1 and report["data_shards"]["disjoint"] is True
    assert report["steps"] == TRAIN["max_steps"] and report["resumed_from_step"] is None
    assert (out / "DONE").is_file() and not (out / "PREEMPTED").exists()
    assert "the run finished (DONE)" in stdout and "requeue" not in stdout


def test_scancel_checkpoints_and_does_not_requeue(cluster, tmp_path, tiny_llama_dir, small_alpaca, cache_dir):
    folder = tmp_path / "cancelled"
    script, out = write_job(folder, tiny_llama_dir, small_alpaca, "cancelled")
    job_id = cluster.submit(script, job_env(cache_dir))
    wait_training(cluster, job_id, out, restarts=0)
    cluster.client("scancel", job_id)
    info = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    stdout, stderr = job_logs(folder, "cancelled", job_id)
    detail = f"{info}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", detail
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and 0 < marker["step"] < TRAIN["max_steps"], detail
    assert (checkpoints_dir(out) / f"step-{marker['step']}").is_dir(), detail  # the one PREEMPTED points to
    assert not (out / "DONE").exists() and "not requeueing it from here" in stderr, detail
