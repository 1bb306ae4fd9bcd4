"""``qlora-dist slurm``: an sbatch script for a multi-node run that survives preemption and time limits.

The script runs one ``srun`` task per node; each task starts ``accelerate launch`` (torchrun) for that node's
GPUs, and all nodes meet at the first node of the allocation. The pieces that are easy to get wrong, and why:

- ``SLURM_NODEID`` is read *inside* the srun task. Read in the batch shell it is 0 on every node (the batch
  shell runs on the first node only), every node claims machine rank 0 and the rendezvous hangs.
- Several nodes meet with torchrun's c10d rendezvous at ``main address:port``: the address SLURM itself uses
  for the first node of the allocation (its ``NodeAddr``, which need not be a resolvable host name like the node
  name) and a port derived from the job id. Not with ``--same_network``: with it accelerate hands torchrun
  only ``master_addr``, which c10d ignores, so every node would wait at its own ``localhost:29400``. Node 0
  hosts the rendezvous, said explicitly (``is_host``) instead of guessed from hostnames.
- ``#SBATCH --signal=B:USR1@S`` warns the batch shell (only it) S seconds before the time limit. torchrun has no
  handler for SIGUSR1: it dies and orphans its workers. So the batch shell traps USR1 and has SLURM send SIGTERM
  to the job's steps (``scancel --signal=TERM $SLURM_JOB_ID``: without ``--batch``/``--full`` the batch shell
  itself is not signalled). Not ``kill -TERM`` to srun: srun answers SIGTERM with "forcing job termination" and
  SIGKILLs every task, so nothing would be saved. torchrun and the workers get the SIGTERM, the workers
  checkpoint at the next optimizer step, leave ``PREEMPTED`` in ``output.dir`` and exit; srun stays alive until
  its tasks end and the batch shell then requeues the job.
- ``--gpus-per-node 0`` is CPU nodes: no GPU is requested (a cluster without GRES rejects any GPU request) and
  each node runs ``--processes-per-node`` processes (default 1).
- Whether to requeue is decided from that marker, never from srun's exit status: torchrun exits 1 even when its
  workers saved and exited cleanly. ``DONE`` means the run finished.
- A warning that reaches the run outside its training loop (still loading a large base, or writing its final
  files) makes it exit at once without a checkpoint; the script requeues the job then too, so the next
  allocation resumes from the last checkpoint. It leaves :data:`STARTUP_STOP` in ``output.dir``; a second such
  stop in a row (the allocation too short ever to reach the loop) is not requeued but reported.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

DEFAULT_LAUNCH_CONFIG = "launch_configs/multi_gpu_ddp.yaml"
STARTUP_STOP = ".slurm_stopped_outside_loop"
"""Left in ``output.dir`` by the batch script when the time-limit warning stopped the run outside its training
loop and the job was requeued; removed once a run checkpoints (``PREEMPTED``) or finishes (``DONE``)."""
PORT_BASE, PORT_SPAN = 20000, 20000  # main port = PORT_BASE + SLURM_JOB_ID % PORT_SPAN


@dataclass
class SlurmJob:
    """What ``qlora-dist slurm`` was asked for: the run, the allocation, and where the logs go."""

    config: str
    """Run config YAML, as it will be passed to ``qlora_dist train`` (relative to the submit directory)."""
    nodes: int
    """Nodes to allocate; one srun task (one torchrun) per node."""
    gpus_per_node: int
    """GPUs per node; 0 for CPU nodes (no GPU request). Also the processes per node when neither
    ``processes_per_node``, SLURM_GPUS_ON_NODE nor nvidia-smi says."""
    overrides: list[str] = field(default_factory=list)
    """``section.key=value`` overrides of the run config."""
    launch_config: str = DEFAULT_LAUNCH_CONFIG
    """accelerate launch config (DDP or DeepSpeed); the machine/process flags are given on the command line."""
    partition: str | None = None
    time: str | None = None
    """Time limit, as sbatch takes it (``HH:MM:SS``, ``D-HH:MM:SS``, minutes)."""
    account: str | None = None
    job_name: str | None = None
    """Defaults to ``qlora-<config file stem>``."""
    signal_seconds: int = 300
    """How long before the time limit SLURM sends SIGUSR1: enough for one optimizer step plus a checkpoint."""
    cpus_per_task: int | None = None
    log_dir: str = "."
    """Folder of the ``%x-%j.out/.err`` logs (SLURM does not create it)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Further sbatch options, one per line, e.g. ``--exclusive`` or ``--mem=0``."""
    processes_per_node: int | None = None
    """Training processes per node, fixed. None: on GPU nodes what the node has (SLURM_GPUS_ON_NODE, else
    ``nvidia-smi -L``, else ``gpus_per_node``); on CPU nodes (``gpus_per_node`` 0) one."""

    def command_line(self) -> str:
        """The ``qlora-dist slurm`` command that generates this script (recorded in its header)."""
        args = ["qlora-dist", "slurm", self.config, *self.overrides]
        args += ["--nodes", str(self.nodes), "--gpus-per-node", str(self.gpus_per_node)]
        if self.processes_per_node is not None:
            args += ["--processes-per-node", str(self.processes_per_node)]
        if self.launch_config != DEFAULT_LAUNCH_CONFIG:
            args += ["--launch-config", self.launch_config]
        for flag, value in (
            ("--partition", self.partition),
            ("--time", self.time),
            ("--account", self.account),
            ("--job-name", self.job_name),
            ("--cpus-per-task", self.cpus_per_task),
        ):
            if value is not None:
                args += [flag, str(value)]
        if self.signal_seconds != 300:
            args += ["--signal-seconds", str(self.signal_seconds)]
        if self.log_dir != ".":
            args += ["--log-dir", self.log_dir]
        for extra in self.extra_sbatch:
            args.append(f"--extra-sbatch={_sbatch_option(extra)}")
        return shlex.join(args)


def sbatch_script(job: SlurmJob) -> str:
    """Validate ``job`` against its run and launch configs and render the sbatch script."""
    from .config import load_config

    if job.nodes < 1:
        raise UserError(f"--nodes {job.nodes}: must be at least 1")
    if job.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {job.gpus_per_node}: must be 0 (CPU nodes) or more")
    if job.processes_per_node is not None and job.processes_per_node < 1:
        raise UserError(f"--processes-per-node {job.processes_per_node}: must be at least 1")
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task {job.cpus_per_task}: must be at least 1")
    if job.signal_seconds < 1:
        raise UserError(f"--signal-seconds {job.signal_seconds}: must be at least 1")
    for flag, value in (
        ("--partition", job.partition),
        ("--time", job.time),
        ("--account", job.account),
        ("--log-dir", job.log_dir),
    ):
        if value is not None and (not value or re.search(r"\s", value)):
            raise UserError(f"{flag} {value!r}: must be non-empty, without spaces")
    limit = _time_limit_seconds(job.time)
    if limit is not None and job.signal_seconds >= limit:
        raise UserError(
            f"--signal-seconds {job.signal_seconds} is not shorter than --time {job.time}: "
            "the run would be told to stop before it starts"
        )
    config = load_config(job.config, job.overrides)  # validated here, not hours later in the queue
    if config.output.overwrite or config.train.resume != "auto":
        # A requeued allocation runs the same command: it must pick up the checkpoint, not start over.
        setting = "output.overwrite=true" if config.output.overwrite else f"train.resume={config.train.resume}"
        raise UserError(
            f"{job.config}: {setting} would make every requeue of this job start over (or stop): "
            "pass output.overwrite=false train.resume=auto, or use another output.dir"
        )
    launch = _read_launch_config(job.launch_config)
    _check_strategy(config.train.strategy, launch, job.launch_config)

    name = job.job_name or f"qlora-{Path(job.config).stem}"
    if not re.fullmatch(r"[\w.+-]+", name):
        raise UserError(f"--job-name {name!r}: use letters, digits and . _ + - only")
    sbatch = [
        f"--job-name={name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
    ]
    if job.gpus_per_node > 0:  # CPU nodes request none: a cluster without GPU GRES rejects even a zero request
        sbatch.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task is not None:
        sbatch.append(f"--cpus-per-task={job.cpus_per_task}")
    for flag, value in (("partition", job.partition), ("time", job.time), ("account", job.account)):
        if value is not None:
            sbatch.append(f"--{flag}={value}")
    log_dir = job.log_dir.rstrip("/") or "/"
    sbatch += [
        "--requeue",
        f"--signal=B:USR1@{job.signal_seconds}",
        "--open-mode=append",
        f"--output={log_dir}/%x-%j.out",
        f"--error={log_dir}/%x-%j.err",
    ]
    sbatch += [_sbatch_option(extra) for extra in job.extra_sbatch]

    srun_options = ["--kill-on-bad-exit=1", '--nodes="$SLURM_NNODES"', '--ntasks="$SLURM_NNODES"']
    srun_options.append("--ntasks-per-node=1")
    if job.cpus_per_task is not None:
        # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without this, one CPU per node.
        srun_options.append(f"--cpus-per-task={job.cpus_per_task}")
    overrides = "".join(" " + shlex.quote(a) for a in job.overrides)
    fills = {
        "@COMMAND@": job.command_line(),
        "@SIGNAL_SECONDS@": str(job.signal_seconds),
        "@SBATCH@": "\n".join(f"#SBATCH {line}" for line in sbatch),
        "@RUN_CONFIG@": shlex.quote(job.config),
        "@LAUNCH_CONFIG@": shlex.quote(job.launch_config),
        "@OUTPUT_DIR@": shlex.quote(config.output.dir),
        "@PROCESSES_PER_NODE@": str(_processes_per_node(job)),
        "@PER_NODE@": _PER_NODE_FIXED if job.gpus_per_node == 0 or job.processes_per_node else _PER_NODE_DETECT,
        "@PORT_BASE@": str(PORT_BASE),
        "@PORT_SPAN@": str(PORT_SPAN),
        "@SRUN_OPTIONS@": " ".join(srun_options),
        "@OVERRIDES@": overrides,
        "@STARTUP_STOP@": STARTUP_STOP,
    }
    # One pass, so that a value which happens to contain a placeholder is left alone.
    return re.sub(r"@[A-Z_]+@", lambda m: fills.get(m.group(0), m.group(0)), _TEMPLATE)


def _processes_per_node(job: SlurmJob) -> int:
    """The fixed count, or the fallback when the node does not say how many GPUs it has."""
    if job.processes_per_node is not None:
        return job.processes_per_node
    return job.gpus_per_node if job.gpus_per_node > 0 else 1


def _sbatch_option(extra: str) -> str:
    """``--mem=0`` or ``#SBATCH --mem=0`` -> ``--mem=0``; one option per line."""
    option = extra.strip().removeprefix("#SBATCH").strip()
    if not option.startswith("-") or "\n" in option:
        raise UserError(f"--extra-sbatch {extra!r}: give one sbatch option, e.g. --extra-sbatch=--exclusive")
    return option


def _read_launch_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"launch config not found: {path} (paths are relative to the current directory; "
            "pass --launch-config, e.g. launch_configs/multi_gpu_ddp.yaml from a qlora-dist checkout)"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise UserError(f"{path} is not an accelerate launch config (no distributed_type)")
    return data


def _check_strategy(strategy: str, launch: dict, path: str) -> None:
    """The run config's train.strategy must agree with the launch config (the run would refuse to start)."""
    dtype = str(launch.get("distributed_type", "")).upper()
    stage = (launch.get("deepspeed_config") or {}).get("zero_stage")
    if dtype not in ("MULTI_GPU", "DEEPSPEED", "FSDP", "NO"):
        raise UserError(
            f"{path}: distributed_type {dtype} is not supported here (use a DDP, DeepSpeed or FSDP2 config)"
        )
    wants = {
        "ddp": ("MULTI_GPU", None),
        "zero2": ("DEEPSPEED", 2),
        "zero3": ("DEEPSPEED", 3),
        "fsdp2": ("FSDP", None),
    }.get(strategy)
    if wants is None:
        return
    if dtype != wants[0] or (wants[1] is not None and int(stage or 0) != wants[1]):
        found = dtype + (f" ZeRO-{stage}" if dtype == "DEEPSPEED" else "")
        raise UserError(f"train.strategy={strategy} but {path} launches {found}: make them agree")


def _time_limit_seconds(limit: str | None) -> int | None:
    """Seconds of an sbatch ``--time`` value (None when absent or unlimited); UserError when malformed.

    sbatch takes ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` and ``D-H:M:S``.
    """
    if limit is None or limit.strip().lower() in ("unlimited", "infinite"):
        return None
    days, dash, rest = limit.strip().rpartition("-")
    parts = rest.split(":")
    if len(parts) > 3 or not all(x.isdigit() for x in [*parts, *([days] if dash else [])]):
        raise UserError(f"--time {limit!r}: use HH:MM:SS, D-HH:MM:SS or minutes")
    n = [int(x) for x in parts]
    if days:
        h, m, s = (n + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(n) == 3:
        return n[0] * 3600 + n[1] * 60 + n[2]
    return n[0] * 60 + (n[1] if len(n) == 2 else 0)


# How many processes each node runs (@PER_NODE@ in the node script): fixed, or what the node says it has.
_PER_NODE_FIXED = "per_node=$QLORA_PROCESSES_PER_NODE"
_PER_NODE_DETECT = """per_node=${SLURM_GPUS_ON_NODE:-}
if [ -z "$per_node" ] && command -v nvidia-smi >/dev/null 2>&1; then
  per_node=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU " || true)
fi
case "$per_node" in "" | 0 | *[!0-9]*) per_node=$QLORA_PROCESSES_PER_NODE ;; esac"""

# The sbatch script. Placeholders are @NAME@ (bash uses $ and braces); values are shell-quoted before they go in.
_TEMPLATE = r"""#!/bin/bash
# Generated by: @COMMAND@
# (run in the directory to submit from: the paths here are relative to it; the repository root for the shipped
# examples). Regenerate rather than edit: output.dir below was resolved from the run config and its overrides.
#
# One srun task per node runs `accelerate launch` for that node's processes; the nodes meet at the first node of the
# allocation. @SIGNAL_SECONDS@ s before the time limit SLURM sends SIGUSR1 to this shell only; the trap below has
# SLURM send SIGTERM to the job's steps, every rank checkpoints at its next optimizer step and the run leaves
# PREEMPTED in its output folder; the script then requeues the job and the next allocation resumes from that
# checkpoint (train.resume: auto). A run that finishes leaves DONE.
@SBATCH@

set -uo pipefail  # not -e: srun's status is looked at below, not fatal

# Your environment: whatever puts `accelerate` and qlora_dist on PATH on every node, e.g.
#   source .venv/bin/activate

RUN_CONFIG=@RUN_CONFIG@
OUTPUT_DIR=@OUTPUT_DIR@  # output.dir of the run config (with its overrides)
export LAUNCH_CONFIG=@LAUNCH_CONFIG@
export QLORA_PROCESSES_PER_NODE=@PROCESSES_PER_NODE@
# The same on every node: the address SLURM uses for the first node of the allocation (its NodeAddr: node names
# need not be host names), and a port derived from the job id (stable across requeues of this job, different for
# jobs that share a node).
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "$MAIN_NODE" ]; then
  echo "qlora-dist slurm: scontrol show hostnames gave no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
  exit 1
fi
MAIN_ADDR=$(scontrol show node -o "$MAIN_NODE" 2>/dev/null | sed -n "s/.*NodeAddr=\([^ ]*\).*/\1/p")
if [ -z "$MAIN_ADDR" ] || [ "$MAIN_ADDR" = "(null)" ]; then MAIN_ADDR=$MAIN_NODE; fi
export MAIN_ADDR
export MAIN_PORT=$((@PORT_BASE@ + SLURM_JOB_ID % @PORT_SPAN@))

echo "qlora-dist slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s)," \
  "main $MAIN_NODE at $MAIN_ADDR:$MAIN_PORT"
# A marker left by an earlier allocation must not requeue this one.
rm -f "$OUTPUT_DIR/PREEMPTED"

# What each srun task runs, on its own node. No single quotes inside (it is one single-quoted string).
NODE_SCRIPT='
set -eu
# Read here, inside the task: in the batch shell SLURM_NODEID is 0 on every node and the rendezvous hangs.
node_rank=$SLURM_NODEID
@PER_NODE@
if [ "$SLURM_NNODES" -gt 1 ]; then
  # c10d at MAIN_ADDR:MAIN_PORT, hosted by node 0. Not --same_network: with it accelerate passes only
  # master_addr, which c10d ignores (every node would wait at its own localhost:29400).
  is_host=0
  if [ "$node_rank" = 0 ]; then is_host=1; fi
  rdzv="--rdzv_backend c10d --rdzv_conf is_host=$is_host"
else
  rdzv="--rdzv_backend static"
fi
echo "qlora-dist slurm: node $node_rank of $SLURM_NNODES ($(hostname)): $per_node process(es)"
# exec: torchrun itself is the task, so the SIGTERM SLURM sends the step reaches it (and through it the workers).
# --deepspeed_multinode_launcher standard: torchrun on each node, not pdsh/ssh (ignored by DDP launch configs).
exec accelerate launch --config_file "$LAUNCH_CONFIG" \
  --num_machines "$SLURM_NNODES" --machine_rank "$node_rank" --num_processes $((SLURM_NNODES * per_node)) \
  --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" $rdzv \
  --deepspeed_multinode_launcher standard \
  -m qlora_dist train "$@"
'

# SIGUSR1 (from --signal=B:USR1@...) -> one SIGTERM to the job's steps, sent by SLURM (scancel without --batch
# or --full leaves this shell alone). Not to srun: srun answers SIGTERM by SIGKILLing every task. torchrun must
# never see SIGUSR1: it dies on it and orphans its workers. SIGTERM to this shell means SLURM is ending the job
# (scancel, scontrol requeue, preemption, the time limit): it signals the job steps itself; this shell only
# notes it and lives on to read the markers.
srun_pid=""
stop_requested=0
forwarded=0
terminated=0
forward_stop() {
  stop_requested=1
  if [ -n "$srun_pid" ] && [ "$forwarded" = 0 ]; then
    forwarded=1
    echo "qlora-dist slurm: SIGUSR1: SIGTERM to the steps of job $SLURM_JOB_ID; the run checkpoints at its next" \
      "optimizer step" >&2
    scancel --signal=TERM "$SLURM_JOB_ID" || echo "qlora-dist slurm: scancel --signal=TERM failed" >&2
  fi
}
trap forward_stop USR1
on_term() {
  terminated=1
  echo "qlora-dist slurm: SIGTERM: SLURM is ending the job; waiting for srun" >&2
}
trap on_term TERM

srun @SRUN_OPTIONS@ bash -c "$NODE_SCRIPT" qlora-dist-node "$RUN_CONFIG"@OVERRIDES@ &
srun_pid=$!
if [ "$stop_requested" = 1 ]; then
  # The warning came before srun: give srun a moment to create its step, which is what scancel signals.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    if [ -n "$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -v "\.batch$\|\.extern$")" ]; then break; fi
    sleep 1
  done
  forward_stop
fi
# A trapped signal cuts `wait` short (status > 128): wait again while srun runs, then once more for its own
# status (bash keeps the status of an exited background job).
wait "$srun_pid"
status=$?
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid"
  status=$?
done
if [ "$status" -gt 128 ]; then
  wait "$srun_pid"
  again=$?
  if [ "$again" != 127 ]; then status=$again; fi
fi

# The run's markers decide, not srun's status (torchrun exits 1 after its workers saved and exited cleanly).
if [ -e "$OUTPUT_DIR/PREEMPTED" ] && [ "$terminated" = 1 ]; then
  # Cancelled (a requeue would undo it), or preempted (SLURM requeues a --requeue job itself), or past the limit.
  echo "qlora-dist slurm: the run checkpointed and stopped (PREEMPTED) as SLURM ended the job: not requeueing" \
    "it from here; submit this script again to resume if SLURM does not" >&2
  exit 0
fi
if [ -e "$OUTPUT_DIR/PREEMPTED" ] || [ -e "$OUTPUT_DIR/DONE" ]; then rm -f "$OUTPUT_DIR/@STARTUP_STOP@"; fi
if [ -e "$OUTPUT_DIR/PREEMPTED" ]; then
  echo "qlora-dist slurm: the run checkpointed and stopped (PREEMPTED): requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  echo "qlora-dist slurm: scontrol requeue failed: submit this script again to resume" >&2
  exit 1
fi
if [ -e "$OUTPUT_DIR/DONE" ]; then
  echo "qlora-dist slurm: the run finished (DONE)"
  exit 0
fi
if [ "$stop_requested" = 1 ] && [ "$terminated" = 0 ]; then
  # The time-limit warning came while the run was outside its training loop (still loading the base, or
  # writing its final files): it exited at once, as it must, with no checkpoint from this allocation. Requeue:
  # the next one resumes from the last checkpoint (and loads the base from the quantize-once cache). Twice in
  # a row would mean every allocation ends the same way: stop then.
  if [ -e "$OUTPUT_DIR/@STARTUP_STOP@" ]; then
    rm -f "$OUTPUT_DIR/@STARTUP_STOP@"
    echo "qlora-dist slurm: the time-limit warning came before the run reached its training loop, as in the" \
      "previous allocation: not requeueing (each allocation would end the same way); give the job more --time" >&2
    exit 1
  fi
  mkdir -p "$OUTPUT_DIR" && : > "$OUTPUT_DIR/@STARTUP_STOP@"
  echo "qlora-dist slurm: the time-limit warning came while the run was outside its training loop; it exited" \
    "without a checkpoint: requeueing job $SLURM_JOB_ID to resume from its last checkpoint"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  echo "qlora-dist slurm: scontrol requeue failed: submit this script again to resume" >&2
  exit 1
fi
echo "qlora-dist slurm: srun exited with status $status and the run left neither PREEMPTED nor DONE" >&2
exit "$status"
"""
