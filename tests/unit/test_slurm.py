"""``qlora-dist slurm``: the generated sbatch script, read and run in pieces without SLURM.

What it must contain (the signal line, the USR1 trap, one srun task per node with --kill-on-bad-exit, the node
rank read inside the task, requeue on PREEMPTED), that it is valid bash, that the launch line each node runs is
the right one (run with stand-ins for srun, scontrol and accelerate that only record what they were given), and
that the CLI's input errors are short. The real 2-node run of the script is in tests/distributed/test_multinode.py.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_dist.errors import UserError
from qlora_dist.slurm import SlurmJob, _time_limit_seconds, sbatch_script

REPO = Path(__file__).resolve().parents[2]
DDP = str(REPO / "launch_configs" / "multi_gpu_ddp.yaml")
ZERO3 = str(REPO / "launch_configs" / "deepspeed_zero3.yaml")


@pytest.fixture
def run_config(tmp_path: Path) -> Path:
    """A valid run config; nothing it names has to exist to generate a script."""
    path = tmp_path / "run.yaml"
    config = {
        "model": {"name_or_path": "/models/llama"},
        "data": {"path": "/data/alpaca.jsonl"},
        "output": {"dir": str(tmp_path / "out")},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def render(run_config: Path, **kwargs) -> str:
    kwargs.setdefault("nodes", 2)
    kwargs.setdefault("gpus_per_node", 8)
    kwargs.setdefault("launch_config", DDP)
    return sbatch_script(SlurmJob(config=str(run_config), **kwargs))


def code_lines(script: str) -> list[str]:
    """The script without its comments (the comments mention flags the code must not use)."""
    return [line for line in script.splitlines() if not line.lstrip().startswith("#")]


def node_script(script: str) -> str:
    """The single-quoted command every srun task runs."""
    start = script.index("NODE_SCRIPT='") + len("NODE_SCRIPT='")
    return script[start : script.index("\n'\n", start)]


def test_script_is_valid_bash(run_config, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render(run_config, overrides=["train.lr=1e-4", "output.dir=out dir/it's"]))
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_header(run_config):
    script = render(run_config, partition="gpu", time="1-00:00:00", account="proj7", cpus_per_task=32)
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for wanted in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",  # B: the batch shell only, never torchrun
        "#SBATCH --open-mode=append",
        "#SBATCH --output=./%x-%j.out",
        "#SBATCH --error=./%x-%j.err",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --account=proj7",
        "#SBATCH --job-name=qlora-run",
    ):
        assert wanted in lines, wanted
    # sbatch stops reading options at the first command: every #SBATCH line comes before it.
    first_code = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_code for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))

    bare = render(run_config, signal_seconds=120)
    assert "#SBATCH --signal=B:USR1@120" in bare
    assert not any(flag in bare for flag in ("--partition=", "--time=", "--account=", "--cpus-per-task="))


def test_usr1_trapped_and_sent_to_the_steps_as_sigterm(run_config):
    code = "\n".join(code_lines(render(run_config)))
    assert "trap forward_stop USR1" in code
    # SLURM signals the steps' tasks; never srun itself, which SIGKILLs its tasks on SIGTERM.
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in code
    assert "kill -TERM" not in code and "--batch" not in code and "--full" not in code
    srun_line = next(line for line in code.splitlines() if line.startswith("srun "))
    assert srun_line.endswith("&")  # in the background, so the trap runs while the shell waits
    assert "--kill-on-bad-exit=1" in srun_line and "--ntasks-per-node=1" in srun_line
    assert 'wait "$srun_pid"' in code


def test_node_rank_read_inside_the_srun_task(run_config):
    script = render(run_config)
    inner = node_script(script)
    outer = script.replace(inner, "")
    assert "node_rank=$SLURM_NODEID" in inner and '--machine_rank "$node_rank"' in inner
    assert "SLURM_NODEID" not in "\n".join(code_lines(outer))  # never in the batch shell (0 on every node)


def test_multi_node_launch_uses_c10d_at_the_main_address_without_same_network(run_config):
    inner = "\n".join(code_lines(node_script(render(run_config))))
    assert "--rdzv_backend c10d" in inner
    assert '--main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"' in inner
    # --same_network would make accelerate pass only master_addr, which c10d ignores (it meets at localhost).
    assert "--same_network" not in inner


def test_requeue_decided_by_the_preempted_marker(run_config, tmp_path):
    script = render(run_config)
    code = "\n".join(code_lines(script))
    block = code[code.index('if [ -e "$OUTPUT_DIR/PREEMPTED" ]') :]
    assert block.index('scontrol requeue "$SLURM_JOB_ID"') < block.index('if [ -e "$OUTPUT_DIR/DONE" ]')
    assert f"OUTPUT_DIR={tmp_path / 'out'}" in script


def test_output_dir_follows_the_overrides(run_config):
    script = render(run_config, overrides=["output.dir=/scratch/my run", "train.lr=1e-4"])
    assert "OUTPUT_DIR='/scratch/my run'" in script
    assert "qlora-dist-node \"$RUN_CONFIG\" 'output.dir=/scratch/my run' train.lr=1e-4 &" in script


def test_header_records_the_generating_command(run_config):
    script = render(run_config, overrides=["train.lr=1e-4"], time="02:00:00", extra_sbatch=["#SBATCH --mem=0"])
    command = script.splitlines()[1].removeprefix("# Generated by: ")
    assert shlex.split(command)[:4] == ["qlora-dist", "slurm", str(run_config), "train.lr=1e-4"]
    assert "--extra-sbatch=--mem=0" in command and "#SBATCH --mem=0" in script.splitlines()


def test_input_errors(run_config):
    with pytest.raises(UserError, match="launch config not found"):
        render(run_config, launch_config="nope.yaml")
    with pytest.raises(UserError, match="not found"):
        sbatch_script(SlurmJob(config="missing.yaml", nodes=1, gpus_per_node=1, launch_config=DDP))
    with pytest.raises(UserError, match="unknown key train.lrr"):
        render(run_config, overrides=["train.lrr=1"])
    with pytest.raises(UserError, match="train.strategy=zero3 but"):
        render(run_config, overrides=["train.strategy=zero3"])
    render(run_config, overrides=["train.strategy=zero3"], launch_config=ZERO3)
    render(run_config, overrides=["train.strategy=fsdp2"], launch_config=str(REPO / "launch_configs" / "fsdp2.yaml"))
    with pytest.raises(UserError, match="train.strategy=fsdp2 but"):
        render(run_config, overrides=["train.strategy=fsdp2"])
    with pytest.raises(UserError, match="--nodes 0"):
        render(run_config, nodes=0)
    with pytest.raises(UserError, match="--signal-seconds 300 is not shorter"):
        render(run_config, time="4")
    with pytest.raises(UserError, match="--time"):
        render(run_config, time="4h")
    with pytest.raises(UserError, match="--partition"):
        render(run_config, partition="a b")
    with pytest.raises(UserError, match="--extra-sbatch"):
        render(run_config, extra_sbatch=["exclusive"])
    with pytest.raises(UserError, match="output.overwrite=true would make every requeue"):
        render(run_config, overrides=["output.overwrite=true"])
    with pytest.raises(UserError, match="train.resume=never would make every requeue"):
        render(run_config, overrides=["train.resume=never"])
    with pytest.raises(UserError, match="--gpus-per-node -1: must be 0 "):
        render(run_config, gpus_per_node=-1)
    with pytest.raises(UserError, match="--processes-per-node 0"):
        render(run_config, processes_per_node=0)


def test_cpu_nodes_request_no_gpu(run_config):
    script = render(run_config, gpus_per_node=0)
    assert "--gpus-per-node" not in "\n".join(line for line in script.splitlines() if line.startswith("#SBATCH"))
    assert "gpus" not in "\n".join(code_lines(script)).lower().replace("qlora-dist slurm", "")
    assert "nvidia-smi" not in "\n".join(code_lines(script))
    assert "--gpus-per-node 0" in script.splitlines()[1]  # the generating command


@pytest.mark.parametrize(
    ("limit", "seconds"),
    [("30", 1800), ("30:15", 1815), ("01:00:00", 3600), ("2-00", 172800), ("1-02:30", 95400), ("UNLIMITED", None)],
)
def test_time_limit_forms(limit, seconds):
    assert _time_limit_seconds(limit) == seconds


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QLORA_DIST_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "qlora_dist", "slurm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )


def test_cli_short_error_for_missing_launch_config(run_config):
    proc = _cli(str(run_config), "--nodes", "2", "--gpus-per-node", "8", "--launch-config", "nope.yaml")
    assert proc.returncode == 2
    assert proc.stderr.startswith("qlora-dist: error: launch config not found: nope.yaml")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_prints_or_writes_the_script(run_config, tmp_path):
    printed = _cli(str(run_config), "--nodes", "2", "--gpus-per-node", "4", "--extra-sbatch=--exclusive")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("#!/bin/bash\n") and "#SBATCH --exclusive" in printed.stdout
    out = tmp_path / "jobs" / "run.sbatch"
    written = _cli(
        str(run_config), "--nodes", "2", "--gpus-per-node", "4", "--extra-sbatch=--exclusive", "--output", str(out)
    )
    assert written.returncode == 0, written.stderr
    assert out.read_text() == printed.stdout and out.stat().st_mode & stat.S_IXUSR


@pytest.mark.parametrize("example", sorted((REPO / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_shipped_examples_are_what_their_command_generates(example, monkeypatch):
    """The examples are generated, not hand-edited: regenerating one from its header gives the same file."""
    monkeypatch.chdir(REPO)
    command = example.read_text().splitlines()[1].removeprefix("# Generated by: ")
    proc = _cli(*shlex.split(command)[2:])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == example.read_text(), f"regenerate it: {command} --output {example.relative_to(REPO)}"


# ------------------------------------------------------------------------------------------------------------
# The launch line, run: stand-ins record what srun, scontrol and accelerate were given.


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def stub_path(tmp_path: Path) -> Path:
    """scontrol (two hosts), srun (runs its command once per node, one after the other) and an accelerate that
    writes its arguments to launch-<node>.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(
        bin_dir,
        "scontrol",
        'if [ "$1 $2" = "show hostnames" ]; then printf "node-a\\nnode-b\\n"; fi\n'
        'if [ "$1 $2 $3 $4" = "show node -o node-a" ]; then echo "NodeName=node-a Arch=x86_64 $NODE_ADDR Port=0"; fi\n',
    )
    _stub(
        bin_dir,
        "srun",
        'while [ "${1#--}" != "$1" ]; do shift; done\n'
        'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@" || exit $?; done\n',
    )
    _stub(bin_dir, "accelerate", 'printf "%s\\n" "$@" > "$RECORD_DIR/launch-$SLURM_NODEID.txt"\n')
    return bin_dir


def _run_script(script: str, tmp_path: Path, stub_path: Path, **env: str) -> list[list[str]]:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(PATH=f"{stub_path}:{os.environ['PATH']}", RECORD_DIR=str(tmp_path), SLURM_JOB_ID="123456")
    full_env.update({"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", **env})
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=full_env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nodes = int(full_env["SLURM_NNODES"])
    return [(tmp_path / f"launch-{i}.txt").read_text().splitlines() for i in range(nodes)]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize(
    ("gpus_on_node", "nvidia_smi_gpus", "per_node"),
    [("4", None, 4), (None, 2, 2), (None, 0, 8)],
    ids=["SLURM_GPUS_ON_NODE", "nvidia-smi", "fallback"],
)
def test_launch_line_on_each_node(run_config, tmp_path, stub_path, gpus_on_node, nvidia_smi_gpus, per_node):
    lines = "".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n" for i in range(nvidia_smi_gpus or 0))
    _stub(stub_path, "nvidia-smi", f'printf "{lines}"\n')
    env = {"SLURM_GPUS_ON_NODE": gpus_on_node} if gpus_on_node else {}
    launches = _run_script(render(run_config, overrides=["train.lr=1e-4"]), tmp_path, stub_path, **env)
    for rank, args in enumerate(launches):
        assert _flag(args, "--config_file") == DDP
        assert _flag(args, "--num_machines") == "2" and _flag(args, "--machine_rank") == str(rank)
        assert _flag(args, "--num_processes") == str(2 * per_node)
        assert _flag(args, "--main_process_ip") == "node-a"
        assert _flag(args, "--main_process_port") == str(20000 + 123456 % 20000)
        assert _flag(args, "--rdzv_backend") == "c10d" and _flag(args, "--rdzv_conf") == f"is_host={int(rank == 0)}"
        assert _flag(args, "--deepspeed_multinode_launcher") == "standard"
        assert args[args.index("-m") :] == ["-m", "qlora_dist", "train", str(run_config), "train.lr=1e-4"]


@pytest.mark.parametrize(
    ("node_addr", "main"),
    [("NodeAddr=10.1.2.3", "10.1.2.3"), ("NodeAddr=(null)", "node-a"), ("", "node-a")],
    ids=["NodeAddr", "null", "none"],
)
def test_main_address_is_the_first_nodes_node_addr(run_config, tmp_path, stub_path, node_addr, main):
    """Node names need not resolve: the address SLURM itself uses for node 0, the name only when it has none."""
    launches = _run_script(render(run_config), tmp_path, stub_path, NODE_ADDR=node_addr, SLURM_GPUS_ON_NODE="1")
    assert [_flag(args, "--main_process_ip") for args in launches] == [main, main]


@pytest.mark.parametrize(
    ("gpus_per_node", "processes_per_node", "per_node"),
    [(0, None, 1), (0, 3, 3), (8, 2, 2)],
    ids=["cpu", "cpu-3", "gpu-2"],
)
def test_fixed_processes_per_node(run_config, tmp_path, stub_path, gpus_per_node, processes_per_node, per_node):
    """CPU nodes run one process each unless told otherwise; a fixed count wins over what the node reports."""
    _stub(stub_path, "nvidia-smi", 'printf "GPU 0: NVIDIA H100 (UUID: GPU-0)\\n"\n')
    script = render(run_config, gpus_per_node=gpus_per_node, processes_per_node=processes_per_node)
    for args in _run_script(script, tmp_path, stub_path, SLURM_GPUS_ON_NODE="4"):
        assert _flag(args, "--num_processes") == str(2 * per_node)


def test_single_node_launch_uses_static_rendezvous(run_config, tmp_path, stub_path):
    (args,) = _run_script(render(run_config, nodes=1), tmp_path, stub_path, SLURM_NNODES="1", SLURM_GPUS_ON_NODE="8")
    # c10d without an endpoint (accelerate gives it one only for several machines) would meet at localhost:29400.
    assert _flag(args, "--rdzv_backend") == "static" and _flag(args, "--num_processes") == "8"
