"""``qlora-dist check``: find the known-bad combinations before a GPU is touched.

Each check calls the rule where it lives (the strategy's ``check``, ``model.check_target_modules``,
``data.check_rows``, ...), so ``check`` and ``train`` refuse exactly the same things. Nothing heavy is loaded:
the model is built on the meta device from its ``config.json``, and data rows are read and validated, not
tokenized. Each check gives one line: ok, warning, or error with the setting to change.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config
from .errors import UserError

# The oldest release of each dependency that has what qlora_dist uses from it.
MINIMUM_VERSIONS = {
    "torch": ("2.4", "non-reentrant checkpointing and DDP communication hooks on gloo"),
    "transformers": ("4.56", "packed-sequence attention masks from position ids; bnb_4bit_quant_storage"),
    "peft": ("0.15", "all-linear targets and get/set_peft_model_state_dict"),
    "bitsandbytes": ("0.48", "4-bit layers and 8-bit optimizers on CPU as well as CUDA"),
    "accelerate": ("1.2", "InitProcessGroupKwargs backend selection"),
    "datasets": ("3.0", "load_dataset/load_from_disk as used here"),
}
DEEPSPEED_MINIMUM = ("0.16", "exclude_frozen_parameters in checkpoints; ZeRO-3 with 4-bit storage")
FSDP2_TORCH_MINIMUM = ("2.8", "FSDP2's fully_shard with ignored_params and set_custom_all_gather")


@dataclass
class Finding:
    level: str  # "ok" | "warning" | "error"
    check: str
    message: str


def launch_env(launch_config: str | None, num_processes: int | None) -> dict[str, str]:
    """The variables ``accelerate launch --config_file FILE`` would give each worker, for the checks; without
    a file, this process's own environment (a real launch) or a single process."""
    if launch_config is None:
        env = dict(os.environ)
        if num_processes:
            env["WORLD_SIZE"] = str(num_processes)
        return env
    from .plan import read_launch_config

    return read_launch_config(launch_config).to_env(num_processes)


def run_checks(
    config_path: str | None,
    overrides: list[str] | None = None,
    launch_config: str | None = None,
    num_processes: int | None = None,
    config: RunConfig | None = None,
) -> list[Finding]:
    """Every check, in order; stops early only when a later check cannot run without an earlier one."""
    findings: list[Finding] = []

    def run(name: str, fn: Callable[[], str | tuple[str, str]]) -> bool:
        try:
            result = fn()
        except UserError as e:
            findings.append(Finding("error", name, str(e)))
            return False
        level, message = result if isinstance(result, tuple) else ("ok", result)
        findings.append(Finding(level, name, message))
        return level != "error"

    holder: dict[str, Any] = {}

    def check_config() -> str:
        holder["config"] = config if config is not None else load_config(config_path, overrides)
        return f"{config_path or 'run config'} is valid"

    if not run("config", check_config):
        return findings
    cfg: RunConfig = holder["config"]
    env = launch_env(launch_config, num_processes)
    run("launch", lambda: _check_launch(cfg, env))
    run("versions", lambda: _check_versions(env))
    if cfg.train.report_to:
        run("trackers", lambda: _check_trackers(cfg))
    model_ok = run("model", lambda: _check_model(cfg, holder))
    tokenizer_ok = run("tokenizer", lambda: _check_tokenizer(cfg, holder))
    if tokenizer_ok:
        run("data", lambda: _check_data(cfg, holder))
    if model_ok:
        run("quant", lambda: _check_quant(cfg))
        run("lora", lambda: _check_lora(cfg, holder))
        run("disk", lambda: _check_disk(cfg, holder))
        run("memory", lambda: _check_memory(config_path, overrides, launch_config, num_processes, env))
    return findings


def print_findings(findings: list[Finding]) -> None:
    width = max(len(f.check) for f in findings)
    for f in findings:
        print(f"{f.level:<8}{f.check:<{width + 2}}{f.message}")
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"\n{len(findings)} checks: {errors} error(s), {warnings} warning(s)")


# -- the checks -------------------------------------------------------------------------------------------


def _check_launch(cfg: RunConfig, env: Mapping[str, str]) -> str | tuple[str, str]:
    import torch

    from .strategies import resolve_strategy

    strategy = resolve_strategy(cfg, env)  # the strategy's own rules (ZeRO-3 storage dtype, init flag, ...)
    world = int(env.get("WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if gpus and world > gpus and int(env.get("LOCAL_WORLD_SIZE", world)) > gpus:
        raise UserError(
            f"{world} processes but {gpus} GPU(s) visible on this machine: processes would share GPUs; "
            f"launch with --num_processes {gpus} (per machine) or make more GPUs visible"
        )
    device = f"{world} x GPU" if gpus else f"{world} CPU process(es) over gloo (no GPU here)"
    note = f"strategy {strategy.name}, {device}"
    optimizer = strategy.optimizer_name(cfg.train.optimizer)
    if optimizer != cfg.train.optimizer:
        return "warning", f"{note}; train.optimizer={cfg.train.optimizer} becomes {optimizer} under this launch"
    return note


def _check_versions(env: Mapping[str, str]) -> str:
    from packaging.version import Version

    wanted = dict(MINIMUM_VERSIONS)
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        wanted["deepspeed"] = DEEPSPEED_MINIMUM
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        wanted["torch"] = FSDP2_TORCH_MINIMUM
    found = []
    for package, (minimum, why) in wanted.items():
        try:
            have = metadata.version(package)
        except metadata.PackageNotFoundError:
            raise UserError(f"{package} is not installed; pip install '{package}>={minimum}' ({why})") from None
        if Version(have) < Version(minimum):
            raise UserError(f"{package} {have} is too old: need >= {minimum} for {why}; pip install -U {package}")
        found.append(f"{package} {have}")
    return ", ".join(found)


def _check_trackers(cfg: RunConfig) -> str:
    from .trackers import check_installed

    check_installed(cfg.train.report_to)  # the same one-line error, naming the extra, that train gives
    return f"{', '.join(cfg.train.report_to)} installed; project {cfg.train.project}"


def _check_model(cfg: RunConfig, holder: dict) -> str:
    from .model import count_params, linear_layer_names, meta_model

    model = meta_model(cfg.model)
    holder["linear_names"] = linear_layer_names(model)
    holder["meta_model"] = model
    holder["total_params"] = count_params(model)[1]
    n = holder["total_params"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return f"{cfg.model.name_or_path}: {model.config.model_type}, {size} parameters (from config.json, no weights)"


def _check_tokenizer(cfg: RunConfig, holder: dict) -> str:
    from .model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer of {cfg.model.tokenizer or cfg.model.name_or_path} has no eos token")
    holder["tokenizer"] = tok
    template = "with" if getattr(tok, "chat_template", None) else "without"
    return f"{type(tok).__name__}, vocab {len(tok)}, {template} a chat template"


def _check_data(cfg: RunConfig, holder: dict) -> str:
    from .data import _require_chat_template, check_rows, load_rows
    from .formats import get_format

    found = []
    for source in cfg.data.sources():  # data.path, or each of data.datasets in its own format
        rows = load_rows(source.path)
        fmt = check_rows(rows, source.format, source.path)
        if get_format(fmt).needs_chat_template:
            _require_chat_template(holder["tokenizer"])
        weight = f", weight {source.weight:g}" if cfg.data.datasets else ""
        found.append(f"{source.path}: {len(rows)} rows, {fmt} format{weight}")
    return "; ".join(found) + ", every row has what the format needs"


def _check_quant(cfg: RunConfig) -> str | tuple[str, str]:
    """The share of the decoder weights a 4-bit load will hold in 4-bit (meta model), and the QLoRA rule."""
    import torch

    from .model import resolve_dtype
    from .quant import coverage

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predicted, model_type = coverage.predict_for(cfg.model, cfg.quant, resolve_dtype(cfg.quant.compute_dtype, device))
    coverage.require_qlora(predicted, model_type, cfg.quant.allow_unquantized, "predicted from config.json")
    if predicted.fraction < coverage.MIN_FRACTION:
        return "warning", f"{predicted.summary()}: NOT QLoRA (quant.allow_unquantized=true)"
    return predicted.summary()


def _check_lora(cfg: RunConfig, holder: dict) -> str:
    from .model import resolve_targets

    targets = resolve_targets(holder["meta_model"], cfg.lora)  # all-linear: this model's real layer names
    how = "all-linear: " if cfg.lora.target_modules == "all-linear" else ""
    return f"targets {how}{', '.join(targets)} (linear layers: {', '.join(holder['linear_names'])})"


def _check_disk(cfg: RunConfig, holder: dict) -> str | tuple[str, str]:
    out = Path(cfg.output.dir).resolve()
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    params = holder["total_params"]
    merged = params * (4 if cfg.quant.compute_dtype == "float32" else 2) if cfg.output.merge else 0
    lora_guess = max(params // 100, 1)  # adapters are ~0.1-1% of the base; optimizer state 2x that in fp32
    checkpoints = cfg.output.keep_checkpoints * lora_guess * 4 * 3
    need = merged + checkpoints
    message = (
        f"{free / 2**30:.1f} GiB free at {existing}; about {need / 2**30:.2f} GiB needed (merged model + checkpoints)"
    )
    if free < need:
        raise UserError(message + ": free some space, choose another output.dir, or set output.merge=false")
    if free < 1.2 * need:
        return "warning", message + " (little headroom)"
    return message


def _check_memory(config_path, overrides, launch_config, num_processes, env) -> str | tuple[str, str]:
    """The memory planner's verdict for the GPUs of this launch (skipped on a machine without one)."""
    import torch

    if not torch.cuda.is_available():
        return "ok", "no GPU here: run `qlora-dist plan CONFIG --gpu-memory 80GiB` to size a GPU run"
    try:
        from . import plan
    except ImportError:
        return "ok", "memory planner not available"
    return plan.doctor_verdict(config_path, overrides, launch_config, num_processes)
