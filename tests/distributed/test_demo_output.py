"""The golden test of a first contact: ``qlora-dist demo``'s output, with stdout and stderr not a terminal (as in
a CI log or ``make demo > log``), holds no warning from any library and no carriage-return redraws; and, run
with ``train.report_to=[tensorboard]``, its TensorBoard events hold exactly ``metrics.jsonl``, step by step.

The demo's own tiny base model takes minutes to pretrain on 2 CPU cores; the test seeds the demo's model cache
with the tests' tiny Llama instead, so what runs is the demo's launch, training, merge and summary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from qlora_dist.demo import ASSETS_VERSION

from .conftest import REPO, run_env

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("demo")
    cache = tmp / "cache"
    shutil.copytree(tiny_llama_dir, cache / f"demo-model-{ASSETS_VERSION}")
    out = tmp / "out"
    cmd = [sys.executable, "-m", "qlora_dist", "demo", "--output", str(out)]
    cmd += ["train.max_steps=4", "train.eval_steps=2", "train.progress_steps=2", "train.report_to=[tensorboard]"]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600, env=run_env(cache), cwd=REPO
    )
    text = proc.stdout.decode()
    (tmp / "demo_output.txt").write_text(text)  # what a user sees, kept for a failing test's reader
    assert proc.returncode == 0, text[-4000:]
    return out, text


def test_demo_output_is_clean_without_a_terminal(demo):
    out, text = demo
    assert "\r" not in text  # no progress-bar redraws
    noisy = [line for line in text.splitlines() if re.search(r"Warning|WARNING|warnings\.warn", line)]
    assert not noisy, "\n".join(noisy)
    assert "== qlora-dist demo ==" in text and "processes          2 x cpu" in text
    progress = [line for line in text.splitlines() if re.match(r"qlora-dist: step \d+/4 ", line)]
    assert [line.split()[2] for line in progress] == ["2/4", "4/4"]
    assert all("tok/s" in line and "ETA" in line and "GiB" in line for line in progress)
    assert len(text.splitlines()) < 40, text  # it was 97 lines, most of them redraws and warnings


def test_demo_tensorboard_events_equal_metrics_jsonl(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = demo
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    events = EventAccumulator(str(out / "runs" / "qlora-dist")).Reload()
    train = [r for r in rows if "loss" in r]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/tokens_per_s", "tokens_per_s")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train], tag
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    assert len(evals) == 2  # at step 2 and at the end
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in evals
    ]
    report = json.loads((out / "run_report.json").read_text())
    assert report["world_size"] == 2 and report["data_sources"][0]["format"] == "alpaca"
