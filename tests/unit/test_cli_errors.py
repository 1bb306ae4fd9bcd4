"""The real ``qlora-dist`` command line, run as a subprocess (``python -m qlora_dist``): every input error is one
short ``qlora-dist: error:`` line naming the problem and where it is, exit status 2, no traceback and no
half-written output folder; ``--debug`` shows the traceback; ``validate`` prints the resolved config; and one
small single-process ``train`` runs end to end."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

TIMEOUT_S = 300  # a hang fails the test instead of blocking the suite
ERROR_PREFIX = "qlora-dist: error:"


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        QLORA_DIST_CACHE=str(tmp_path_factory.mktemp("qlora_dist_cache")),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",  # several run at once on a small machine; their compute is tiny
    )
    env.pop("QLORA_DIST_DEBUG", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a single process, whatever launched pytest
    return env


@pytest.fixture
def cli(cli_env, tmp_path):
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "qlora_dist", *args],
            cwd=tmp_path,
            env={**cli_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )

    return run


def make_config(folder: Path, model_dir: Path, data_file: Path, **changes: dict) -> tuple[Path, Path]:
    """Write a small valid run config into ``folder`` (sections updated by ``changes``); returns (config, output dir)."""
    out = folder / "out"
    config = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data_file), "format": "alpaca", "max_length": 64},
        "train": {"max_steps": 3, "micro_batch_size": 4, "lr": 1e-3, "optimizer": "adamw"},
        "output": {"dir": str(out), "merge": True},
    }
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, out


@pytest.fixture
def write_config(tmp_path, tiny_llama_dir, demo_data_dir):
    def write(**changes: dict) -> tuple[Path, Path]:
        return make_config(tmp_path, tiny_llama_dir, demo_data_dir / "alpaca_demo.jsonl", **changes)

    return write


def error_line(result: subprocess.CompletedProcess) -> str:
    """Assert the short-error contract and return the error line."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, result.stderr
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- config errors (fail before anything heavy is imported) ----------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("train.lr=fast", "train.lr", "not a number"),
        ("train.lr=5", "train.lr", "out of range"),
        ("lora.r=0", "lora.r", "out of range"),
        ("train.optimizer=sgd", "train.optimizer", "adamw"),
        ("quant.double_quant=maybe", "quant.double_quant", "boolean"),
        ("train.lr=.nan", "train.lr", "not a finite number"),  # NaN passes every range check
        ("train.max_grad_norm=.inf", "train.max_grad_norm", "not a finite number"),
    ],
)
def test_bad_config_value_names_the_key(cli, write_config, override, key, words):
    config, out = write_config()
    line = error_line(cli("train", str(config), override))
    assert key in line and words in line
    assert not out.exists()


def test_bad_value_in_the_config_file_names_the_key(cli, write_config):
    config, out = write_config(train={"micro_batch_size": "four"})
    line = error_line(cli("train", str(config)))
    assert "train.micro_batch_size" in line and "four" in line
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "override"])
def test_unknown_config_key_is_named_with_the_allowed_ones(cli, write_config, where):
    if where == "file":
        config, out = write_config(train={"learning_rate": 1e-3})
        line = error_line(cli("train", str(config)))
    else:
        config, out = write_config()
        line = error_line(cli("train", str(config), "train.learning_rate=1e-3"))
    assert "train.learning_rate" in line and "lr" in line and "max_steps" in line
    assert not out.exists()


def test_invalid_yaml_names_file_and_line(cli, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  name_or_path: ./m\ntrain:\n  lr: [1e-3\n")
    line = error_line(cli("validate", str(config)))
    assert re.search(rf"{re.escape(str(config))}:\d+", line), line  # file:line
    assert "invalid YAML" in line


def test_missing_config_file(cli, tmp_path):
    line = error_line(cli("train", str(tmp_path / "nope.yaml")))
    assert "nope.yaml" in line and "not found" in line


def test_malformed_override(cli, write_config):
    config, out = write_config()
    line = error_line(cli("train", str(config), "trainlr=3"))
    assert "trainlr=3" in line and "section.key=value" in line
    assert not out.exists()


# -- errors found once the libraries are loaded (model, data, output, merge), and one real run ----------------
# Each of these processes imports torch, transformers and datasets (seconds of CPU each), so they are all started
# together when the first of their tests runs, a few at a time, and each test then reads its own process's result.


@dataclass
class Case:
    """Inputs of one prepared CLI invocation (built in its own folder)."""

    args: list[str]
    out: Path  # the output folder: the run's, or the one an erroring run must not create
    info: dict = field(default_factory=dict)
    python_options: list[str] = field(default_factory=list)  # e.g. -X importtime: what the process imported


@dataclass
class Launched:
    case: Case
    future: Future

    @property
    def result(self) -> subprocess.CompletedProcess:
        return self.future.result()

    @property
    def out(self) -> Path:
        return self.case.out

    @property
    def info(self) -> dict:
        return self.case.info


@dataclass
class Inputs:
    model_dir: Path
    data_file: Path
    adapter: Path  # enough of an adapter folder to pass the merge argument checks (they run before any load)


HEAVY: dict[str, Callable[[Path, Inputs], Case]] = {}


def heavy(build: Callable[[Path, Inputs], Case]) -> Callable[[Path, Inputs], Case]:
    HEAVY[build.__name__] = build
    return build


@pytest.fixture(scope="module")
def launched(cli_env, tmp_path_factory, tiny_llama_dir, demo_data_dir) -> Iterator[dict[str, Launched]]:
    root = tmp_path_factory.mktemp("cli_cases")
    adapter = root / "fake_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    inputs = Inputs(tiny_llama_dir, demo_data_dir / "alpaca_demo.jsonl", adapter)

    def run(case: Case, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *case.python_options, "-m", "qlora_dist", *case.args],
            cwd=cwd,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )

    workers = min(4, max(2, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = {}
        for name in sorted(HEAVY, key=lambda n: n != "train_end_to_end"):  # the real run first: the longest
            build = HEAVY[name]
            folder = root / name
            folder.mkdir()
            case = build(folder, inputs)
            started[name] = Launched(case, pool.submit(run, case, folder))
        try:
            yield started
        finally:
            for launched_case in started.values():
                launched_case.future.result()
                if launched_case.info.get("mount"):
                    subprocess.run(["umount", str(launched_case.info["mount"])], check=False)


@heavy
def bad_row(d: Path, inputs: Inputs) -> Case:
    data = write_jsonl(
        d / "rows.jsonl",
        [
            {"instruction": "Say hi.", "output": "Hi."},
            {"instruction": "Say bye.", "output": "Bye."},
            {"instruction": "Say nothing."},  # line 3: no output
            {"instruction": "Count to two.", "output": "One, two."},
        ],
    )
    config, out = make_config(d, inputs.model_dir, data)
    return Case(["train", str(config)], out, {"data": data})


def test_bad_data_row_names_file_and_line(launched):
    run = launched["bad_row"]
    line = error_line(run.result)
    assert f"{run.info['data']}, line 3" in line and "'output'" in line
    assert not run.out.exists()


IMPORTTIME = ["-X", "importtime"]  # one stderr line per module imported: "import time: ... | name"


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@heavy
def missing_model(d: Path, inputs: Inputs) -> Case:
    missing = d / "no_such_model"
    config, out = make_config(d, missing, inputs.data_file)
    return Case(["train", str(config)], out, {"path": missing}, IMPORTTIME)


@heavy
def missing_data(d: Path, inputs: Inputs) -> Case:
    missing = d / "missing.jsonl"
    config, out = make_config(d, inputs.model_dir, missing)
    return Case(["train", str(config)], out, {"path": missing}, IMPORTTIME)


@heavy
def empty_data(d: Path, inputs: Inputs) -> Case:
    data = d / "empty.jsonl"
    data.write_text("")
    config, out = make_config(d, inputs.model_dir, data)
    return Case(["train", str(config)], out, {"path": data}, IMPORTTIME)


@pytest.mark.parametrize(
    ("case", "words"),
    [("missing_model", "model.name_or_path"), ("missing_data", "not found"), ("empty_data", "no rows")],
)
def test_a_missing_or_empty_input_names_the_path(launched, case, words):
    """Refused by the file-system checks, before transformers, datasets or peft are imported (see cmd_train)."""
    run = launched[case]
    line = error_line(run.result)
    assert str(run.info["path"]) in line and words in line
    assert not run.out.exists()
    modules = imported(run.result.stderr)
    assert "qlora_dist.doctor" in modules and not modules & {"transformers", "datasets", "peft", "bitsandbytes"}


@heavy
def finished_run(d: Path, inputs: Inputs) -> Case:
    config, out = make_config(d, inputs.model_dir, inputs.data_file)
    out.mkdir()
    (out / "run_report.json").write_text('{"world_size": 1}')
    return Case(["train", str(config)], out)


def test_finished_run_is_not_overwritten(launched):
    run = launched["finished_run"]
    line = error_line(run.result)
    assert str(run.out) in line and "output.overwrite" in line
    assert sorted(p.name for p in run.out.iterdir()) == [".qlora-dist.lock", "run_report.json"]  # the lock only


@heavy
def merge_non_empty_out(d: Path, inputs: Inputs) -> Case:
    out = d / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    return Case(["merge", "--base", str(inputs.model_dir), "--adapter", str(inputs.adapter), "--out", str(out)], out)


def test_merge_refuses_a_non_empty_out_folder(launched):
    run = launched["merge_non_empty_out"]
    line = error_line(run.result)
    assert str(run.out) in line and "--out" in line
    assert [p.name for p in run.out.iterdir()] == ["keep.txt"]


# -- hardened runs: every fixable problem one line, before the weights load where it can be ------------------


def _model_copy(d: Path, inputs: Inputs) -> Path:
    model = d / "model"
    shutil.copytree(inputs.model_dir, model)
    return model


@heavy
def non_utf8_data(d: Path, inputs: Inputs) -> Case:
    data = d / "rows.jsonl"
    data.write_bytes(b'{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": "caf\xe9", "output": "Yes."}\n')
    config, out = make_config(d, inputs.model_dir, data)
    return Case(["train", str(config)], out, {"data": data})


def test_non_utf8_data_names_the_line_and_byte(launched):
    run = launched["non_utf8_data"]
    line = error_line(run.result)
    assert f"{run.info['data']}, line 2" in line and "0xe9" in line and "UTF-8" in line
    assert not run.out.exists()


@heavy
def single_json_object(d: Path, inputs: Inputs) -> Case:
    data = d / "rows.json"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}))
    config, out = make_config(d, inputs.model_dir, data)
    return Case(["train", str(config)], out, {"data": data})


def test_json_file_with_one_object_is_refused(launched):
    line = error_line(launched["single_json_object"].result)
    assert "one JSON object, not a list of rows" in line


@heavy
def unknown_chat_role(d: Path, inputs: Inputs) -> Case:
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 3
    rows.append({"messages": [{"role": "wizard", "content": "Abracadabra"}, {"role": "assistant", "content": "?"}]})
    data = write_jsonl(d / "chat.jsonl", rows)
    config, out = make_config(d, inputs.model_dir, data, data={"format": "chat"})
    return Case(["train", str(config)], out, {"data": data})


def test_unknown_chat_role_is_refused(launched):
    run = launched["unknown_chat_role"]
    line = error_line(run.result)
    assert f"{run.info['data']}, line 4" in line and "'wizard'" in line and "assistant" in line


@heavy
def truncated_weights(d: Path, inputs: Inputs) -> Case:
    model = _model_copy(d, inputs)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config, out = make_config(d, model, inputs.data_file)
    return Case(["train", str(config)], out)


def test_truncated_weight_file_is_named_before_loading(launched):
    run = launched["truncated_weights"]
    line = error_line(run.result)
    assert "model.safetensors" in line and "truncated" in line and "download it again" in line
    assert not run.out.exists()


@heavy
def remote_code_model(d: Path, inputs: Inputs) -> Case:
    model = _model_copy(d, inputs)
    config_json = json.loads((model / "config.json").read_text())
    config_json.update(model_type="my_own_llama", auto_map={"AutoConfig": "my_code.MyConfig"})
    (model / "config.json").write_text(json.dumps(config_json))
    config, out = make_config(d, model, inputs.data_file)
    return Case(["train", str(config)], out, {"config": config})


def test_model_that_needs_remote_code_is_one_line(launched, cli):
    run = launched["remote_code_model"]
    line = error_line(run.result)
    assert "model.trust_remote_code=true" in line and "auto_map" in line
    check = cli("check", str(run.info["config"]))
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "model.trust_remote_code=true" in check.stdout


@heavy
def output_is_a_file(d: Path, inputs: Inputs) -> Case:
    config, out = make_config(d, inputs.model_dir, inputs.data_file)
    out.write_text("not a folder")
    return Case(["train", str(config)], out)


def test_output_dir_that_is_a_file(launched):
    run = launched["output_is_a_file"]
    line = error_line(run.result)
    assert str(run.out) in line and "is a file" in line
    assert run.out.read_text() == "not a folder"


@heavy
def output_unwritable(d: Path, inputs: Inputs) -> Case:
    config, _ = make_config(d, inputs.model_dir, inputs.data_file, output={"dir": "/proc/qlora-dist-test/out"})
    return Case(["train", str(config)], Path("/proc/qlora-dist-test/out"))


def test_output_dir_on_a_read_only_filesystem(launched):
    line = error_line(launched["output_unwritable"].result)
    assert "/proc" in line and "writable output.dir" in line
    assert "free some space" not in line  # not a disk-space problem


@heavy
def corrupt_checkpoints(d: Path, inputs: Inputs) -> Case:
    config, out = make_config(d, inputs.model_dir, inputs.data_file)
    root = out / "checkpoints"
    for step, manifest in ((2, "{}"), (4, "null"), (6, '{"files": {}}')):
        ckpt = root / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
        (ckpt / "manifest.json").write_text(manifest)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return Case(["train", str(config)], out, {"files": files})


def test_checkpoints_that_do_not_verify_are_kept_and_refused(launched):
    run = launched["corrupt_checkpoints"]
    line = error_line(run.result)
    assert "step-6, step-4, step-2" in line and "output.overwrite=true" in line and "nothing was deleted" in line
    unusable = run.out / "checkpoints" / "unusable"
    assert sorted(p.name for p in unusable.iterdir()) == ["step-2", "step-4", "step-6"]
    assert "manifest lists no files" in (unusable / "step-6" / "REASON").read_text()
    kept = sorted(str(p.relative_to(unusable)) for p in unusable.rglob("*") if p.is_file() and p.name != "REASON")
    assert kept == run.info["files"]  # every file still there
    assert not (run.out / "metrics.jsonl").exists() and not (run.out / "config.yaml").exists()


FILL_DISK = """
from pathlib import Path


class FillDisk:
    \"\"\"Fills the output folder's (small) filesystem once, at step STEP's EVENT.\"\"\"

    def _fill(self, event):
        with open(Path(event.output_dir) / "filler", "ab") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError:
                pass

    def EVENT(self, event):
        if event.step == STEP:
            self._fill(event)
"""


def _small_disk(d: Path, inputs: Inputs, event: str, step: int) -> Case:
    mount = d / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    (d / "fill_disk.py").write_text(FILL_DISK.replace("EVENT", event).replace("STEP", str(step)))
    config, _ = make_config(
        d, inputs.model_dir, inputs.data_file, output={"dir": str(mount / "out")},
        train={"max_steps": 4, "save_steps": 2, "callbacks": ["fill_disk:FillDisk"]},
    )  # fmt: skip
    if mounted.returncode != 0:  # not allowed here (no root / no CAP_SYS_ADMIN): the test skips
        return Case(["validate", str(config)], mount / "out", {"skip": mounted.stderr.decode()[:200]})
    return Case(["train", str(config)], mount / "out", {"mount": mount})


@heavy
def disk_full_at_checkpoint(d: Path, inputs: Inputs) -> Case:
    return _small_disk(d, inputs, "on_step_end", 3)


@heavy
def disk_full_at_adapter(d: Path, inputs: Inputs) -> Case:
    return _small_disk(d, inputs, "on_checkpoint_saved", 4)


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(launched):
    run = launched["disk_full_at_checkpoint"]
    if run.info.get("skip"):
        pytest.skip(f"cannot mount a small tmpfs here: {run.info['skip']}")
    line = error_line(run.result)
    assert "no space left on the device writing" in line and "resumes" in line
    from qlora_dist import checkpoint

    assert [p.name for p in checkpoint.step_dirs(run.out / "checkpoints")] == ["step-2"]
    assert checkpoint.verify(run.out / "checkpoints" / "step-2") is None


def test_full_disk_at_the_adapter_leaves_no_partial_adapter(launched):
    run = launched["disk_full_at_adapter"]
    if run.info.get("skip"):
        pytest.skip(f"cannot mount a small tmpfs here: {run.info['skip']}")
    line = error_line(run.result)
    assert "no space left on the device writing the adapter" in line
    assert not (run.out / "adapter").exists() and not (run.out / "run_report.json").exists()


# -- the happy path: one real single-process run -------------------------------------------------------------


@heavy
def train_end_to_end(d: Path, inputs: Inputs) -> Case:
    # The default optimizer (bitsandbytes' paged 8-bit AdamW, unpaged on a CPU), as a user's first run has it.
    config, out = make_config(d, inputs.model_dir, inputs.data_file, train={"optimizer": "paged_adamw_8bit"})
    return Case(["train", str(config)], out)


def test_train_single_process_end_to_end(launched):
    run = launched["train_end_to_end"]
    result, out = run.result, run.out
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    report = json.loads((out / "run_report.json").read_text())
    assert report["world_size"] == 1 and report["device"] == "cpu"
    assert report["grad_sync_bytes_per_step"] == 0  # one process: nothing is all-reduced
    assert report["steps"] == 3
    assert report["base_checksum_after"] == [report["base_checksum_before"]]
    assert len(report["lora_checksum_per_rank"]) == 1
    assert 0 < report["trainable_params"] < report["total_params"]
    assert report["trainable_grad_bytes"] == 4 * report["trainable_params"]  # fp32 adapters on a CPU

    merge = report["merge"]
    assert merge is not None and merge["base"] == "dequantized"
    assert merge["rel_logit_error"] is not None and merge["rel_logit_error"] <= 1e-4
    # The same check in the training loss: QLoRA and merged model's next-token loss, by token_loss_sum.
    assert merge["reference_loss"] > 0 and abs(merge["loss_difference"]) <= merge["loss_bound"]
    merged = out / "merged"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    assert not list(merged.glob("*.bin")) and not (out / "merged.tmp").exists()
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "qlora_dist.json").is_file()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert (out / "loss.png").is_file() and (out / "loss.png").stat().st_size > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 3


# -- --debug and validate -------------------------------------------------------------------------------------


def test_debug_shows_the_traceback(cli, write_config):
    config, out = write_config()
    result = cli("--debug", "train", str(config), "train.lr=fast")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr and "train.lr" in result.stderr
    assert not out.exists()
    via_env = cli("train", str(config), "train.lr=fast", env={"QLORA_DIST_DEBUG": "1"})
    assert via_env.returncode != 0 and "Traceback" in via_env.stderr


def test_validate_prints_the_resolved_config(cli, write_config):
    config, out = write_config()
    result = cli("validate", str(config), "train.lr=3e-4", "lora.target_modules=q_proj,v_proj")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved) == {"model", "quant", "lora", "data", "train", "output"}
    assert resolved["train"]["lr"] == pytest.approx(3e-4) and isinstance(resolved["train"]["lr"], float)
    assert resolved["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert resolved["quant"]["quant_type"] == "nf4"  # a default filled in
    assert resolved["train"]["max_steps"] == 3 and resolved["output"]["dir"] == str(out)
    assert not out.exists()
    # The printed config is itself a valid config that resolves to the same thing.
    again = config.with_name("resolved.yaml")
    again.write_text(result.stdout)
    assert yaml.safe_load(cli("validate", str(again)).stdout) == resolved
