"""Single-process pieces of hardened runs, on real files and real processes: the output folder's lock, checkpoint
verification and moving aside, the disk preflight's sizes, and the one-line refusals that need no model load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlora_dist import checkpoint, lock
from qlora_dist.config import load_config
from qlora_dist.errors import DataError, UserError

# -- the lock ---------------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from qlora_dist import lock
lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_lock_refuses_a_second_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as refused:
            lock.acquire(out)
        message = str(refused.value)
        assert str(out) in message and f"pid {holder.pid}" in message and "host " in message
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        holder.wait(timeout=30)
        held = lock.acquire(out)  # never stale
        assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.acquire(out) is held  # this process already holds it: the same lock
        held.release()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_lock_refuses_a_file_as_output_dir(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        lock.acquire(out)


# -- checkpoints --------------------------------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint folder with the files every checkpoint has (plain tensors) and its manifest."""
    path = root / f"step-{step}"
    (path / "adapter").mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step}))
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"rng": torch.zeros(3)}, path / "rank-0.pt")
    checkpoint._write_manifest(path)
    return path


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        ("{}", "manifest lists no files"),
        ("null", "manifest lists no files"),
        ('{"files": {}}', "manifest lists no files"),
        ('{"files": {"state.json": {"size": 1, "sha256": "x"}}}', "does not list adapter/adapter_model.safetensors"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_a_manifest_that_proves_nothing_does_not_verify(tmp_path, manifest, problem):
    path = fake_checkpoint(tmp_path, 2)
    (path / checkpoint.MANIFEST).write_text(manifest)
    assert problem in checkpoint.verify(path)


def test_a_planted_pickle_does_not_verify_and_never_runs(tmp_path):
    path = fake_checkpoint(tmp_path, 2)
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker)}, path / "scheduler.pt")
    (path / checkpoint.MANIFEST).unlink()
    checkpoint._write_manifest(path)  # the manifest proves integrity, not origin
    assert "scheduler.pt is not a plain tensor file (refused to unpickle" in checkpoint.verify(path)
    assert not marker.exists()


def test_unusable_checkpoints_are_moved_aside_with_a_reason(tmp_path):
    root = tmp_path / "checkpoints"
    good, bad = fake_checkpoint(root, 2), fake_checkpoint(root, 4)
    (bad / "scheduler.pt").write_bytes(b"flipped")
    assert checkpoint.choose(root) == good
    aside = root / checkpoint.UNUSABLE / "step-4"
    assert not bad.exists() and (aside / "scheduler.pt").read_bytes() == b"flipped"
    assert "scheduler.pt does not match its checksum" in (aside / checkpoint.REASON).read_text()
    # Again with the same name: the earlier one is not overwritten.
    again = fake_checkpoint(root, 4)
    (again / "state.json").write_text("{}")
    assert checkpoint.choose(root) == good
    assert sorted(p.name for p in (root / checkpoint.UNUSABLE).iterdir()) == ["step-4", "step-4.2"]


def test_when_nothing_verifies_the_run_is_refused_and_nothing_deleted(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (fake_checkpoint(root, step) / "rank-0.pt").unlink()
    with pytest.raises(UserError, match=r"no checkpoint in .* verifies \(step-4, step-2.*output.overwrite=true"):
        checkpoint.choose(root)
    assert sorted(p.name for p in (root / checkpoint.UNUSABLE).iterdir()) == ["step-2", "step-4"]
    assert checkpoint.choose(tmp_path / "empty") is None  # no checkpoints at all: a fresh start


# -- disk preflight --------------------------------------------------------------------------------------------------


def disk_findings(tmp_path, tiny_llama_dir, demo_data_dir, *overrides):
    from qlora_dist import doctor

    config = load_config(
        None,
        [
            f"model.name_or_path={tiny_llama_dir}",
            f"data.path={demo_data_dir / 'alpaca_demo.jsonl'}",
            f"output.dir={tmp_path / 'out'}",
            *overrides,
        ],
    )
    return {f.check: f for f in doctor.run_checks(None, config=config)}


def test_disk_preflight_sizes_the_merge_in_its_real_dtype(tmp_path, tiny_llama_dir, demo_data_dir, monkeypatch):
    from qlora_dist import doctor
    from qlora_dist.model import count_params, meta_model

    found = disk_findings(tmp_path, tiny_llama_dir, demo_data_dir)
    model_cfg = load_config(None, [f"model.name_or_path={tiny_llama_dir}", "data.path=x"]).model
    params = count_params(meta_model(model_cfg))[1]
    # merge_dtype auto on a CPU is float32: 4 bytes per parameter, not 2.
    assert f"merged model {params * 4 / 2**20:.1f} MiB in float32" in found["disk"].message
    bf16 = disk_findings(tmp_path, tiny_llama_dir, demo_data_dir, "output.merge_dtype=bfloat16")
    assert f"merged model {params * 2 / 2**20:.1f} MiB in bfloat16" in bf16["disk"].message
    # Little space: the advice fits the case (no output.merge=false when merging is already off).
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: doctor.shutil._ntuple_diskusage(100, 100, 10))
    off = disk_findings(tmp_path, tiny_llama_dir, demo_data_dir, "output.merge=false", "output.keep_checkpoints=1")
    assert (
        off["disk"].level == "error"
        and "merge" not in off["disk"].message
        and "keep_checkpoints" not in off["disk"].message
    )
    on = disk_findings(tmp_path, tiny_llama_dir, demo_data_dir)
    assert "output.merge=false" in on["disk"].message and "lower output.keep_checkpoints" in on["disk"].message


def test_output_check_refuses_a_file_and_an_unwritable_place(tmp_path, tiny_llama_dir, demo_data_dir):
    (tmp_path / "out").write_text("x")
    found = disk_findings(tmp_path, tiny_llama_dir, demo_data_dir)
    assert found["output"].level == "error" and "is a file" in found["output"].message and "disk" not in found
    proc = disk_findings(tmp_path, tiny_llama_dir, demo_data_dir, "output.dir=/proc/nope/out")
    assert proc["output"].level == "error" and "not writable" in proc["output"].message


# -- data -------------------------------------------------------------------------------------------------------


def test_data_refusals(tmp_path):
    from qlora_dist.data import check_rows, load_rows

    latin1 = tmp_path / "rows.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "ol\xe9"}\n')
    with pytest.raises(DataError, match=r"line 2: byte 0xe9 at column 13 is not UTF-8"):
        load_rows(str(latin1))
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "a"}))
    with pytest.raises(DataError, match="one JSON object, not a list of rows"):
        load_rows(str(one))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"text": "a"}]))
    assert len(load_rows(str(listed))) == 1  # one row in a list is fine
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="role 'wizard'"):
        check_rows(load_rows(str(chat)), "chat", str(chat))


def test_signals_before_the_loop_end_the_process_at_once(tmp_path):
    """A process blocked in C++ (here: a TCPStore wait, as a rank waiting for its peers is) still exits on SIGTERM
    within a second, with status 143."""
    code = (
        "import datetime, torch.distributed as dist\n"
        "from qlora_dist.preemption import StopSignal\n"
        "StopSignal.install()\n"
        "store = dist.TCPStore('127.0.0.1', 0, 1, True, timeout=datetime.timedelta(seconds=60))\n"
        "print('waiting', flush=True)\n"
        "store.wait(['never'])\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        sent = time.perf_counter()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        took = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and took < 3, (proc.returncode, took, err)
    assert "received SIGTERM during start-up: exiting" in err


def test_a_worker_whose_launcher_is_killed_gets_sigterm(tmp_path):
    """torchrun starts workers in their own session, so a SIGKILL of the launcher's process group left them
    training on. A worker (LOCAL_RANK set) asks the kernel for SIGTERM when its parent dies."""
    child = (
        "import time\n"
        "from qlora_dist.preemption import StopSignal\n"
        "StopSignal.install()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    launcher = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True, stdout=subprocess.PIPE,\n"
        f"                     stderr=open({str(tmp_path / 'child.err')!r}, 'w'), text=True)\n"
        "assert p.stdout.readline().strip() == 'ready'\n"
        "print(p.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    pythonpath = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "LOCAL_RANK": "0"}
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(parent.stdout.readline())
        parent.kill()  # SIGKILL: the launcher forwards nothing
        parent.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid), "the worker outlived its launcher"
    finally:
        if parent.poll() is None:
            parent.kill()
    assert "received SIGTERM during start-up" in (tmp_path / "child.err").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"
