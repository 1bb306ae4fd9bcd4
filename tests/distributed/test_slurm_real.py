"""The generated sbatch script on a real SLURM: munged, slurmctld and two slurmd (n1, n2) on this machine.

See ``slurm_cluster.py`` for the cluster. The script is generated for CPU nodes (``--gpus-per-node 0``, one
process per node) and submitted with sbatch; every check reads what SLURM and the run left behind:

- what the design rests on, shown on real srun with a task that traps SIGTERM: SIGTERM to srun SIGKILLs the tasks
  (their handler never runs), while ``scancel --signal=TERM JOB`` reaches the tasks and spares the batch shell
  (the same probe holds the stand-in srun of ``test_multinode.py`` to this);
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
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_dist.checkpoint import checkpoints_dir
from qlora_dist.slurm import STARTUP_STOP, SlurmJob, sbatch_script

from .conftest import LAUNCH_CONFIGS, read_report, run_env, write_run_config
from .slurm_cluster import SlurmCluster, assert_probe, ensure_slurm, wait_probe_started, write_probe

pytestmark = pytest.mark.distributed

JOB_TIMEOUT_S = 240
# Plain AdamW, fp32 on CPU: bit-exact resume. Enough steps that three stops can each land mid-run: a step of
# the tiny model takes 0.1-0.2 s, and the 40 steps once used ran out (6.6 s) before a USR1 sent at the first
# logged step reached the run through a loaded slurmctld. A checkpoint every 30 steps on top of the ones the
# stops take. log_steps 1: metrics.jsonl shows every step.
TRAIN = {"max_steps": 120, "micro_batch_size": 2, "optimizer": "adamw", "save_steps": 30, "log_steps": 1}


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


def write_job(folder: Path, tiny_llama_dir: Path, data: Path, name: str, **options) -> tuple[Path, Path]:
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
        **options,
    )
    script = folder / "job.sbatch"
    script.write_text(sbatch_script(job))
    return script, out


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


@pytest.mark.parametrize("how", ["kill srun", "scancel --signal=TERM"])
def test_srun_passes_no_sigterm_on_but_scancel_signals_the_steps(cluster, tmp_path, how):
    """What the script's trap is built on; the stand-in srun of test_multinode.py is held to the same probe."""
    script = write_probe(tmp_path, sys.executable)
    job_id = cluster.submit(script, {"PATH": os.environ.get("PATH", ""), "PROBE": str(tmp_path)})
    srun_pid = wait_probe_started(tmp_path)
    if how == "kill srun":
        os.kill(srun_pid, signal.SIGTERM)  # srun runs on this machine, under n1's slurmstepd
    else:
        cluster.client("scancel", "--signal=TERM", job_id)
    assert_probe(tmp_path, how)
    assert cluster.wait_finished(job_id, 60)["JobState"] == "COMPLETED"


@dataclass
class Job:
    name: str
    folder: Path
    out: Path
    id: str

    def logs(self) -> tuple[str, str]:
        """The job's .out and .err, appended to across its requeues."""
        read = lambda ext: (self.folder / f"{self.name}-{self.id}.{ext}").read_text(errors="replace")  # noqa: E731
        return read("out"), read("err")

    def detail(self, info: dict[str, str]) -> str:
        out, err = self.logs()
        return f"{info}\n--- {self.name}.out:\n{out[-3000:]}\n--- {self.name}.err:\n{err[-6000:]}"


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory, tiny_llama_dir, small_alpaca, cache_dir) -> dict[str, Job]:
    """Jobs submitted at once, side by side on the two nodes (one CPU of each node each): ``whole`` runs to the
    end, ``stopped`` is stopped three times, ``cancelled`` is cancelled (both by the first test), ``timed`` meets
    its time limit with a stand-in for the training run."""
    submitted = {}
    for name in ("whole", "stopped", "cancelled", "timed"):
        folder = tmp_path_factory.mktemp(name)
        env = job_env(cache_dir)
        options = {}
        if name == "timed":
            options = {"time": "1", "signal_seconds": TIMED_SIGNAL_S}
            env["PATH"] = os.pathsep.join([str(write_fake_accelerate(folder / "bin")), env["PATH"]])
        script, out = write_job(folder, tiny_llama_dir, small_alpaca, name, **options)
        env["FAKE_OUT"] = str(out)
        submitted[name] = Job(name, folder, out, cluster.submit(script, env))
    return submitted


# The time limit's warning, with a stand-in for the training run (nothing to compute while SLURM's clock runs):
# slurmctld looks at time limits about every 30 s, so the warning comes 30-60 s into a 1-minute job.
TIMED_SIGNAL_S = 45
FAKE_ACCELERATE = """#!/bin/bash
# Stand-in for `accelerate launch ... -m qlora_dist train`: the first allocation waits for SIGTERM and exits
# without a marker, as a run still loading its base does (the real run's stop in its loop, with PREEMPTED, is
# the `stopped` job's); a requeued one finishes (DONE) at once.
log="$FAKE_OUT/../fake-$SLURM_NODEID.log"
mkdir -p "$FAKE_OUT"
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  if [ "$SLURM_NODEID" = 0 ]; then echo '{"step": 2}' > "$FAKE_OUT/DONE"; fi
  echo "allocation $SLURM_RESTART_COUNT: done" >> "$log"
  exit 0
fi
trap 'echo "got USR1" >> "$log"' USR1
trap 'echo "got TERM" >> "$log"; exit 143' TERM
echo "allocation 0: waiting" >> "$log"
while :; do sleep 0.2; done
"""


def write_fake_accelerate(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "accelerate").write_text(FAKE_ACCELERATE)
    (folder / "accelerate").chmod(0o755)
    return folder


def test_time_limit_warning_stops_the_steps_and_requeues(cluster, jobs):
    """--signal=B:USR1@45 with --time=1: the batch shell is warned, the tasks get SIGTERM (never USR1) while
    the run is still starting (it exits without a checkpoint), the job is requeued before its limit, and the next
    allocation runs."""
    job = jobs["timed"]
    info = cluster.wait_finished(job.id, 150)
    detail = job.detail(info)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1 and info["ExitCode"] == "0:0", detail
    for node in (0, 1):
        lines = (job.folder / f"fake-{node}.log").read_text().splitlines()
        assert lines == ["allocation 0: waiting", "got TERM", "allocation 1: done"], (node, lines, detail)
    stdout, stderr = job.logs()
    assert "SIGUSR1: SIGTERM to the steps of job" in stderr and f"requeueing job {job.id}" in stdout, detail
    assert "outside its training loop; it exited without a checkpoint" in stdout, detail
    assert "DUE TO TIME LIMIT" not in stderr and (job.out / "DONE").is_file(), detail
    assert not (job.out / STARTUP_STOP).exists(), detail  # the requeued allocation finished: the note is gone


def test_stopped_three_ways_resumes_to_the_same_adapter(cluster, jobs):
    job, cancelled, whole = jobs["stopped"], jobs["cancelled"], jobs["whole"]

    # 1. The script's own warning: USR1 to the batch shell only, as --signal=B:USR1@S sends it. And scancel for
    #    the job the last test checks.
    wait_training(cluster, job.id, job.out, restarts=0)
    cluster.client("scancel", "--batch", "--signal=USR1", job.id)
    wait_training(cluster, cancelled.id, cancelled.out, restarts=0)
    cluster.client("scancel", cancelled.id)
    # 2. SLURM requeues it itself: SIGTERM to the batch shell and the steps.
    wait_training(cluster, job.id, job.out, restarts=1)
    cluster.client("scontrol", "requeue", job.id)
    # 3. A job in the higher-priority partition needs both nodes whole: PreemptMode=REQUEUE.
    wait_training(cluster, job.id, job.out, restarts=2)
    for other in (whole, cancelled, jobs["timed"]):  # or they would be preempted too
        cluster.wait_finished(other.id, JOB_TIMEOUT_S)
    assert steps_logged(job.out) < TRAIN["max_steps"], "the stopped job finished before it could be preempted"
    high = job.folder / "high.sbatch"
    high.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --partition=high\n#SBATCH --output=/dev/null\ntrue\n")
    high_id = cluster.submit(high, {"PATH": os.environ.get("PATH", "")})

    info = cluster.wait_finished(job.id, JOB_TIMEOUT_S)
    detail = job.detail(info)
    assert cluster.wait_finished(high_id, 60)["JobState"] == "COMPLETED"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", detail
    assert int(info["Restarts"]) >= 3, detail

    # Each stop checkpointed at a step boundary with SIGTERM (never USR1, which torchrun dies of), and the next
    # allocation resumed from that step.
    stdout, stderr = job.logs()
    stops = [int(s) for s in re.findall(r"preempted by SIGTERM at step (\d+)", stderr)]
    assert len(stops) == 3 and stops == sorted(stops) and stops[0] > 0 and stops[-1] < TRAIN["max_steps"], detail
    resumed = [int(s) for s in re.findall(r"resumed from \S+: step (\d+)", stderr)]
    assert resumed == stops, detail
    assert "received SIGUSR1" not in stderr, detail
    assert stderr.count("SIGUSR1: SIGTERM to the steps of job") == 1, detail
    assert stdout.count(f"requeueing job {job.id}") == 1, detail  # the USR1 stop; SLURM requeued the others
    assert stderr.count("not requeueing it from here") == 2, detail
    report = read_report(job.out)
    assert report["world_size"] == 2 and report["steps"] == TRAIN["max_steps"], detail
    assert report["resumed_from_step"] == stops[-1], detail
    assert (job.out / "DONE").is_file() and not (job.out / "PREEMPTED").exists()

    # Bit for bit the adapter of the job that was never stopped.
    assert cluster.job(whole.id)["JobState"] == "COMPLETED"
    a, b = adapter(job.out), adapter(whole.out)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_uninterrupted_job_is_one_two_rank_run(cluster, jobs):
    job = jobs["whole"]
    info = cluster.wait_finished(job.id, JOB_TIMEOUT_S)
    detail = job.detail(info)
    stdout, _ = job.logs()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", detail
    assert info["NodeList"] == "n[1-2]", detail
    # The node names are not host names: the rendezvous address is n1's NodeAddr.
    assert re.search(r"main n1 at 127\.0\.0\.1:\d+", stdout), detail
    assert "node 0 of 2" in stdout and "node 1 of 2" in stdout, detail  # each task read its own SLURM_NODEID
    report = read_report(job.out)
    assert report["world_size"] == 2 and report["distributed_type"] == "MULTI_CPU", detail
    assert len(set(report["lora_checksum_per_rank"])) == 1 and report["data_shards"]["disjoint"] is True
    assert report["steps"] == TRAIN["max_steps"] and report["resumed_from_step"] is None
    assert (job.out / "DONE").is_file() and not (job.out / "PREEMPTED").exists()
    assert "the run finished (DONE)" in stdout and "requeue" not in stdout


def test_scancel_checkpoints_and_does_not_requeue(cluster, jobs):
    job = jobs["cancelled"]
    info = cluster.wait_finished(job.id, JOB_TIMEOUT_S)
    detail = job.detail(info)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", detail
    marker = json.loads((job.out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and 0 < marker["step"] < TRAIN["max_steps"], detail
    assert (checkpoints_dir(job.out) / f"step-{marker['step']}").is_dir(), detail
    assert not (job.out / "DONE").exists() and "not requeueing it from here" in job.logs()[1], detail
