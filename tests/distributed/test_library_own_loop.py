"""examples/library_own_loop.py under real 2-process launches: a user's own loop and loss, on two mixed data
sets, stopped with a checkpoint and continued by the same command, tracked by TensorBoard and MLflow.

One interrupted-and-resumed 2-rank run against one uninterrupted 1-rank run with twice the micro-batch checks
at once: exact resume, 2 ranks x b == 1 rank x 2b on a mixture, the loss helper, and that the trackers hold
exactly ``metrics.jsonl``, step by step, in one tracker run across both launches.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, launch, read_report, write_run_config

pytestmark = pytest.mark.distributed

EXAMPLE = str(REPO / "examples" / "library_own_loop.py")
TRAIN = {"max_steps": 4, "optimizer": "adamw", "save_steps": 0, "max_grad_norm": 1.0}


def sources(small_alpaca, demo_data_dir) -> list[dict]:
    return [
        {"path": str(small_alpaca), "format": "alpaca", "weight": 0.5},
        {"path": str(demo_data_dir / "completion_demo.jsonl"), "weight": 1.5},
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, small_alpaca, demo_data_dir, cache_dir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("own_loop")
    mlruns = tmp / "mlruns"
    env = {"MLFLOW_TRACKING_URI": mlruns.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    data = {"path": "", "datasets": sources(small_alpaca, demo_data_dir)}
    two = write_run_config(
        tmp / "two.yaml",
        tiny_llama_dir,
        small_alpaca,
        tmp / "two",
        data=data,
        train={**TRAIN, "micro_batch_size": 2, "report_to": ["tensorboard", "mlflow"], "run_name": "own-loop"},
        output={"merge": False},
    )
    one = write_run_config(
        tmp / "one.yaml",
        tiny_llama_dir,
        small_alpaca,
        tmp / "one",
        data=data,
        train={**TRAIN, "micro_batch_size": 4},
        output={"merge": False},
    )
    first = launch([EXAMPLE, str(two), "--steps-per-launch", "2"], cache_dir, env=env)
    assert "stopped at step 2" in first.stdout and not (tmp / "two" / "run_report.json").exists()
    second = launch([EXAMPLE, str(two)], cache_dir, env=env)  # the same command continues
    launch([EXAMPLE, str(one)], cache_dir, launch_config="single_gpu.yaml", num_processes=1)
    return tmp, mlruns, second


def test_resumed_two_rank_run_equals_uninterrupted_one_rank_run(runs):
    tmp, _, second = runs
    r2, r1 = read_report(tmp / "two"), read_report(tmp / "one")
    assert (r2["world_size"], r1["world_size"]) == (2, 1) and r2["distributed_type"] == "MULTI_CPU"
    assert r2["resumed_from_step"] == 2 and r2["steps"] == r1["steps"] == 4
    assert "step 3/4" in second.stdout and "step 1/4" not in second.stdout  # nothing replayed
    assert r2["grad_sync_bytes_per_step"] == r2["trainable_grad_bytes"]  # plugin.prepare: counted
    a2 = load_file(tmp / "two" / "adapter" / "adapter_model.safetensors")
    a1 = load_file(tmp / "one" / "adapter" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys()
    # The gradient of every step is the same (fp32 on CPU: only the order of floating-point sums differs), in
    # both launches of the resumed run: the norm before clipping agrees to ~1e-7.
    norms = [[r["grad_norm"] for r in metrics_rows(tmp / name) if "grad_norm" in r] for name in ("one", "two")]
    assert len(norms[0]) == 4 and norms[1] == pytest.approx(norms[0], rel=1e-5)
    # AdamW divides by the root of the squared-gradient average, which amplifies those ~1e-7 differences where a
    # gradient is near zero: the weights agree to ~1e-5 of their ~1e-1 scale (and moved by ~1e-2 in 4 steps).
    for key in a1:
        assert torch.allclose(a1[key], a2[key], rtol=1e-3, atol=2e-4), key
    assert max(float(t.abs().max()) for k, t in a1.items() if "lora_B" in k) > 1e-3  # it trained


def test_report_counts_each_source(runs):
    tmp, _, _ = runs
    report = read_report(tmp / "two")
    alpaca, completion = report["data_sources"]
    assert (alpaca["format"], completion["format"]) == ("alpaca", "completion")
    assert alpaca["examples"] == 64 and alpaca["train_examples"] == 32
    assert completion["train_examples"] == completion["examples"] + round(0.5 * completion["examples"])
    assert report["num_examples"] == alpaca["train_examples"] + completion["train_examples"]


def metrics_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_tensorboard_events_equal_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, _ = runs
    rows = [r for r in metrics_rows(tmp / "two") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(tmp / "two" / "runs" / "qlora-dist")).Reload()
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [1, 2, 3, 4], tag  # both launches, each step once
        assert [v for _, v in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), tag


def test_mlflow_holds_one_run_across_both_launches(runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database unless told otherwise

    tmp, mlruns, _ = runs
    client = MlflowClient(tracking_uri=mlruns.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "qlora-dist"]
    (run,) = client.search_runs([experiment.experiment_id])  # resumed into the same run, not a second one
    state = json.loads((tmp / "two" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["trackers"]["mlflow"] == run.info.run_id and run.info.run_name == "own-loop"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    rows = [r for r in metrics_rows(tmp / "two") if "loss" in r]
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert [v for _, v in history] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    # The resolved run config is the hyperparameters; nothing from the environment.
    assert run.data.params["train/micro_batch_size"] == "2" and run.data.params["lora/r"] == "8"
    assert {k.split("/")[0] for k in run.data.params} == {"model", "quant", "lora", "data", "train", "output"}
