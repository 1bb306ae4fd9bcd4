"""A real SLURM on this machine for the tests: munged, slurmctld and two slurmd (nodes n1 and n2), no GPUs.

Everything lives in one temporary folder: the munge key and socket, ``slurm.conf`` (found through
``SLURM_CONF``, which every client and every job inherits), state, spool, pid and log files. The daemons run in
the foreground as children of the test process and are stopped by their PIDs, after every job of this cluster
has been cancelled and its processes have ended. Nothing is written to /etc, nothing is started through the
service manager, and no SLURM already on the machine is touched (its own config is never read).

The node names (n1, n2) are not host names: both nodes have ``NodeAddr=127.0.0.1``, as on clusters where
NodeName and NodeAddr differ, so a script that takes a node's name for its address fails here.

``ensure_slurm()`` installs Debian's ``slurm-wlm`` when it is missing (root with apt-get only) and says why not
otherwise; the test skips with that reason, except under CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
NODES = ("n1", "n2")
SBIN = ("/usr/sbin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def _missing() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


def ensure_slurm() -> str | None:
    """None when SLURM's daemons and clients are here (installing Debian's slurm-wlm if need be), else why not."""
    if not _missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(_missing())} missing) and this is not root with apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    log = []
    for cmd in (install, ["apt-get", "update", "-q"], install):  # the package lists may be stale or absent
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        log.append(f"$ {' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        if cmd is install and proc.returncode == 0 and not _missing():
            return None
    return "apt-get could not install slurm-wlm:\n" + "\n".join(log)


def _die_with_parent() -> None:
    """In the daemon before exec: SIGTERM when the test process dies, even killed (no teardown then)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; Linux only


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """Two nodes of 4 CPUs each; partition ``test`` (default) and, for preemption, ``high``.

    ``high`` has a higher PriorityTier and ``PreemptMode=REQUEUE``: a job there takes both nodes
    (``OverSubscribe=EXCLUSIVE``) and requeues what runs in ``test``.
    """

    def __init__(self, root: Path, kill_wait: int = 120):
        self.root = root
        self.conf = root / "slurm.conf"
        self.kill_wait = kill_wait
        self.procs: dict[str, subprocess.Popen] = {}
        self.cpus = 4  # claimed, whatever the machine has (config_overrides): room for jobs side by side

    # -- environment

    @property
    def env(self) -> dict[str, str]:
        """What the clients (and, through sbatch's --export=ALL, the jobs) need: this cluster's config."""
        path = os.pathsep.join([*SBIN, os.environ.get("PATH", "")])
        return {"SLURM_CONF": str(self.conf), "PATH": path}

    def client(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {proc.returncode}: {proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    # -- start and stop

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # munged refuses a key or socket in a folder others can write
        self._start_munge()
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        self._write_conf(ctld_port, node_ports)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        deadline = time.monotonic() + timeout
        while True:
            states = self.node_states()
            if states and all(s.split("+")[0].upper() in ("IDLE", "MIXED", "ALLOCATED") for s in states.values()):
                return self
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} during start-up\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not up after {timeout} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge.socket"
        cmd = [_which("munged"), "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}"]
        cmd += [f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}"]
        cmd += [f"--seed-file={self.root / 'munged.seed'}"]
        self._spawn("munged", cmd)
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.1)

    def _write_conf(self, ctld_port: int, node_ports: list[int]) -> None:
        r = self.root
        lines = [
            "ClusterName=qlora-test",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups here: processes are tracked by parentage, tasks are not bound.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # A requeued job becomes eligible again without an event: look every second, not every 30-60 s.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # the configured CPUs, whatever this machine has
            # From SIGTERM to SIGKILL when SLURM ends a job: a stopped run needs one step, a checkpoint and its exit.
            # 30 s (SLURM's default) was too short once on a 2-core machine running four of these jobs at once.
            f"KillWait={self.kill_wait}",
            "MinJobAge=3600",  # finished jobs stay visible to scontrol show job (no accounting here)
            "InactiveLimit=0",
        ]
        for node, port in zip(NODES, node_ports, strict=True):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} CPUs={self.cpus}")
        nodes = ",".join(NODES)
        lines.append(f"PartitionName=test Nodes={nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1")
        lines.append(
            f"PartitionName=high Nodes={nodes} MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=EXCLUSIVE"
        )
        (r / "state").mkdir(exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        with (self.root / f"{name}.stdout").open("w") as out:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )

    def stop(self) -> None:
        """Cancel every job, wait for their processes, then stop the daemons by PID (SIGTERM, then SIGKILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.client("scancel", "--full", "--signal=KILL", "--state=RUNNING", "-u", "root", check=False)
                self.client("scancel", "-u", "root", check=False)
                deadline = time.monotonic() + 30
                while self.client("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        self._kill_job_processes()
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self._kill_job_processes()

    def _kill_job_processes(self) -> None:
        """Processes of this cluster's jobs that outlived them (slurmstepd is no child of slurmd): those whose
        environment names this cluster's SLURM_CONF, and nothing else."""
        mine = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error):
                ours = p.pid != os.getpid() and p.pid not in {q.pid for q in self.procs.values()}
                if ours and p.environ().get("SLURM_CONF") == str(self.conf):
                    mine.append(p)
        for p in mine:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(mine, timeout=10)

    # -- queries

    def node_states(self) -> dict[str, str]:
        proc = self.client("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.client("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def submit(self, script: Path, env: dict[str, str], *options: str) -> str:
        """``sbatch --parsable`` from the script's folder, with ``env`` (plus this cluster's) exported."""
        full = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        full.update(self.env, PATH=os.pathsep.join([env.get("PATH", ""), *SBIN]))
        proc = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            capture_output=True,
            text=True,
            env=full,
            cwd=script.parent,
            timeout=30,
        )
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {script} -> {proc.returncode}: {proc.stderr}\n{self.logs()}")
        return proc.stdout.strip().split(";")[0]

    def wait_for(self, job_id: str, predicate, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if predicate(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: not {what} after {timeout} s: {info}")
            time.sleep(0.5)

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        """Until the job is in a final state (a requeued job passes through PENDING again on its way)."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        return self.wait_for(job_id, lambda j: j.get("JobState") in final, timeout, "finished")

    def logs(self, n: int = 3000) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            text = path.read_text(errors="replace")[-n:]
            if text.strip():
                parts.append(f"--- {path.name}:\n{text}")
        return "\n".join(parts)


# A probe of srun's signal semantics, run on the real srun (test_slurm_real.py) and on the stand-in
# (test_multinode.py) alike, so that the stand-in is held to what the real one does.

PROBE_TASK = """
import os, signal, sys, time
log = open(os.path.join(sys.argv[1], "task%s.log" % os.environ["SLURM_NODEID"]), "a", buffering=1)
def on_term(signum, frame):  # a stopping run: one more step and a checkpoint take a few seconds
    log.write("got TERM\\n")
    time.sleep(3)
    log.write("saved\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
log.write("started\\n")
while True:
    signal.pause()
"""

PROBE_BATCH = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
# One task per node that logs the SIGTERM it gets; this shell logs its own and srun's exit status.
trap 'echo "batch got TERM" >> "$PROBE/batch.log"' TERM
srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 {python} "$PROBE/task.py" "$PROBE" &
srun_pid=$!
echo "$srun_pid" > "$PROBE/srun.pid"
wait "$srun_pid"
status=$?
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; status=$?; done
echo "srun exited $status" >> "$PROBE/batch.log"
"""


def write_probe(folder: Path, python: str) -> Path:
    """The probe's batch script (needs ``PROBE=folder`` in its environment) and task, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.py").write_text(PROBE_TASK)
    script = folder / "probe.sbatch"
    script.write_text(PROBE_BATCH.format(python=python))
    script.chmod(0o755)
    return script


def probe_log(folder: Path, name: str) -> list[str]:
    path = folder / f"{name}.log"
    return path.read_text().splitlines() if path.is_file() else []


def wait_probe_started(folder: Path, timeout: float = 60) -> int:
    """Until both tasks run; returns srun's PID."""
    deadline = time.monotonic() + timeout
    while not all(probe_log(folder, f"task{i}") for i in range(2)) or not (folder / "srun.pid").is_file():
        if time.monotonic() > deadline:
            raise AssertionError(f"probe tasks not started after {timeout} s: {sorted(os.listdir(folder))}")
        time.sleep(0.1)
    return int((folder / "srun.pid").read_text())


def wait_probe_ended(folder: Path, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while not any(line.startswith("srun exited") for line in probe_log(folder, "batch")):
        if time.monotonic() > deadline:
            raise AssertionError(f"probe batch shell did not end after {timeout} s: {probe_log(folder, 'batch')}")
        time.sleep(0.1)
    return probe_log(folder, "batch")


def assert_probe(folder: Path, how: str) -> None:
    """What srun does, ``how`` the tasks were signalled:

    - ``kill srun`` (SIGTERM to srun): srun SIGKILLs its tasks ("forcing job termination"), none of which gets to
      finish a stop (real srun's tasks may see a SIGTERM first, the stand-in's do not), and exits non-zero;
    - ``scancel --signal=TERM JOB`` (to the job's steps): each task gets SIGTERM and finishes its stop, srun exits
      with their status (0), and the batch shell gets nothing.
    """
    batch = wait_probe_ended(folder)
    tasks = [probe_log(folder, f"task{i}") for i in range(2)]
    assert "batch got TERM" not in batch, (how, batch, tasks)
    if how == "kill srun":
        assert all(lines[0] == "started" and "saved" not in lines for lines in tasks), (how, batch, tasks)
        assert batch[-1] != "srun exited 0", (how, batch, tasks)
    else:
        assert tasks == [["started", "got TERM", "saved"]] * 2 and batch[-1] == "srun exited 0", (how, batch, tasks)
