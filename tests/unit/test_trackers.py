"""qlora_dist.trackers: names, missing packages, hyperparameters, and W&B offline read back by its own records.

TensorBoard and MLflow are read back from a real 2-process run in ``tests/distributed/test_library_own_loop.py``
(and TensorBoard from ``qlora-dist demo`` in ``tests/distributed/test_demo_output.py``).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_dist import trackers
from qlora_dist.config import load_config
from qlora_dist.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]


def config(**train):
    return load_config(base={"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "train": train})


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.report_to\[1\]='tensorbord' is not a tracker: choose from"):
        config(report_to=["mlflow", "tensorbord"])
    assert config(report_to="tensorboard,wandb").train.report_to == ["tensorboard", "wandb"]


def test_missing_tracker_package_names_the_extra():
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = next((n for n in trackers.KNOWN_TRACKERS if n not in available), None)
    if missing is None:
        pytest.skip("every tracker is installed here")
    with pytest.raises(UserError, match=rf"train.report_to={missing} needs .*pip install 'qlora-dist\[{missing}\]'"):
        trackers.check_installed([missing])


def test_hyperparameters_are_the_resolved_config_flattened():
    cfg = config(report_to=["tensorboard"], lr=1e-4)
    params = trackers.hyperparameters(cfg)
    assert params["train/lr"] == 1e-4 and params["train/report_to"] == '["tensorboard"]'
    assert all(isinstance(v, (bool, int, float, str)) for v in params.values())
    assert {k.split("/")[0] for k in params} == {"model", "quant", "lora", "data", "train", "output"}
    assert trackers.tracker_values({"step": 3, "loss": 1.5, "grad_norm": None, "eval_loss": 2, "elapsed_s": 9}) == {
        "train/loss": 1.5,
        "eval/loss": 2.0,
    }


# One launch: open the tracker run (continuing it when ids are given), log two steps, close it.
SCRIPT = """
import json, sys
from accelerate import Accelerator
from qlora_dist import trackers
from qlora_dist.config import load_config
out, resume, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
cfg = load_config(base={"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "output": {"dir": out},
                        "train": {"report_to": ["wandb"], "run_name": "offline-test"}})
accelerator = Accelerator(cpu=True, **trackers.accelerator_kwargs(["wandb"], out))
ids = trackers.start(accelerator, cfg, ids, resume_step=resume)
for step in (resume + 1, resume + 2):
    trackers.log_row(accelerator, {"step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": None})
trackers.finish(accelerator)
print(json.dumps(ids))
"""


def wandb_records(path: Path):
    """The records of a ``.wandb`` file (a LevelDB-style log of W&B's own protobuf ``Record`` messages)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_run_is_continued_after_a_resume(tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}

    def launch(resume: int, ids: dict) -> dict:
        cmd = [sys.executable, "-c", SCRIPT, str(tmp_path), str(resume), json.dumps(ids)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ids = launch(0, {})
    assert launch(2, ids) == ids  # the id kept in the checkpoint opens the same run
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{ids['wandb']}.wandb" for f in files)
    history, run_ids = {}, set()
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
                assert record.run.display_name == "offline-test"
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[items["_step"]] = items
    assert run_ids == {ids["wandb"]}
    assert sorted(history) == [1, 2, 3, 4]
    assert [history[s]["train/loss"] for s in (1, 2, 3, 4)] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert all("train/grad_norm" not in h for h in history.values())  # null values are left out, not logged as 0


def test_check_reports_the_trackers(tiny_llama_dir, demo_data_dir):
    from qlora_dist.doctor import run_checks

    base = {"model": {"name_or_path": str(tiny_llama_dir)}, "data": {"path": str(demo_data_dir / "text_demo.jsonl")}}
    findings = {
        f.check: f for f in run_checks(None, config=load_config(base={**base, "train": {"report_to": ["tensorboard"]}}))
    }
    assert findings["trackers"].level == "ok" and "tensorboard installed" in findings["trackers"].message
    assert "trackers" not in {f.check for f in run_checks(None, config=load_config(base=base))}
