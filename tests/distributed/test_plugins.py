"""Third-party plugins, installed for real: the example package under examples/plugins, and a broken one.

The example package is installed with pip into a folder of its own that the launched processes get on
PYTHONPATH, so the test environment itself is not modified; qlora_dist finds it through its entry points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, launch, read_report, run_env, write_run_config

pytestmark = pytest.mark.distributed

EXAMPLE_PLUGIN = REPO / "examples" / "plugins" / "qlora-dist-example"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE_PLUGIN)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert list(target.glob("qlora_dist_example_plugin-*.dist-info"))
    return target


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    rows = [
        {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."}
        for a in range(8)
        for b in range(4)
    ]
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def env_with(paths, cache_dir):
    env = run_env(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def launch_with(paths, args, cache_dir, **kwargs):
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_with(paths, cache_dir)["PYTHONPATH"]
    try:
        return launch(args, cache_dir, **kwargs)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def train_with(env: dict[str, str], config) -> subprocess.CompletedProcess:
    """``qlora-dist train CONFIG`` in one process with ``env`` (its PYTHONPATH holds the plugins)."""
    return subprocess.run(
        [sys.executable, "-m", "qlora_dist", "train", str(config)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )  # fmt: skip


def test_plugins_command_lists_the_installed_plugin(plugin_path, cache_dir):
    out = subprocess.run(
        [sys.executable, "-m", "qlora_dist", "plugins"], capture_output=True, text=True, timeout=120,
        env=env_with([plugin_path], cache_dir), cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert any(line.split()[:1] == ["qa"] and "qlora-dist-example-plugin 0.1.0" in line for line in lines)
    assert any(line.split()[:1] == ["loss_log"] and "qlora-dist-example-plugin" in line for line in lines)
    assert any(line.split()[:2] == ["alpaca", "built-in"] for line in lines)


def test_two_process_run_uses_the_plugin_format_and_callback(tmp_path, plugin_path, qa_data, tiny_llama_dir, cache_dir):
    out = tmp_path / "out"
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, qa_data, out,
        data={"format": "qa"}, train={"max_steps": 4, "callbacks": ["loss_log"]}, output={"merge": False},
    )  # fmt: skip
    proc = launch_with([plugin_path], ["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    report = read_report(out)
    assert report["world_size"] == 2 and report["steps"] == 4
    # The format took effect: the run read the qa columns (the built-ins cannot) and said so.
    assert "(qa format)" in proc.stdout + proc.stderr
    # The callback took effect: one line per step, from the main process only, and the end-of-run file.
    logged = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    metrics = {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }
    assert all(r["loss"] == metrics[r["step"]] for r in logged)
    assert json.loads((out / "loss_log_done.json").read_text()) == {"steps": 4}


def test_a_callback_can_stop_the_run_cleanly(tmp_path, plugin_path, qa_data, tiny_llama_dir, cache_dir):
    out = tmp_path / "out"
    cfg = write_run_config(
        tmp_path / "run.yaml", tiny_llama_dir, qa_data, out,
        data={"format": "qa"}, train={"max_steps": 50, "callbacks": ["qlora_dist_example:stop_after_3"]},
    )  # fmt: skip
    launch_with([plugin_path], ["-m", "qlora_dist", "train", str(cfg)], cache_dir)
    report = read_report(out)
    assert report["world_size"] == 2 and report["steps"] == 3 and report["stopped_by_callback"] is True
    assert report["merge"]["rel_logit_error"] <= 1e-4  # a clean stop ends like a normal run
    assert (out / "checkpoints" / "step-3").is_dir()


@pytest.fixture(scope="module")
def broken_plugin_path(tmp_path_factory):
    """A distribution whose format plugin raises at import, installed by hand as a dist-info on PYTHONPATH."""
    site = tmp_path_factory.mktemp("broken_site")
    (site / "broken_qlora_plugin.py").write_text('raise RuntimeError("this plugin is broken on purpose")\n')
    info = site / "broken_qlora_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-qlora-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qlora_dist.formats]\nbroken = broken_qlora_plugin:FORMAT\n")
    return site


def test_a_broken_plugin_fails_only_the_run_that_names_it(
    tmp_path, broken_plugin_path, tiny_llama_dir, small_alpaca, cache_dir
):
    env = env_with([broken_plugin_path], cache_dir)
    named = write_run_config(
        tmp_path / "named.yaml", tiny_llama_dir, small_alpaca, tmp_path / "a", data={"format": "broken"}
    )
    proc = train_with(env, named)
    assert proc.returncode == 2
    assert "the formats plugin 'broken' (entry point broken_qlora_plugin:FORMAT) failed to load" in proc.stderr
    assert (
        "this plugin is broken on purpose" in proc.stderr and "broken_qlora_plugin.py" in proc.stderr
    )  # its traceback
    assert not (tmp_path / "a").exists()

    other = write_run_config(
        tmp_path / "other.yaml",
        tiny_llama_dir,
        small_alpaca,
        tmp_path / "b",
        train={"max_steps": 2},
        output={"merge": False},
    )
    ok = train_with(env, other)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert read_report(tmp_path / "b")["steps"] == 2
