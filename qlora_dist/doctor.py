"""``qlora-dist check``: find the known-bad combinations before a GPU is touched.

Each check calls the rule where it lives (the strategy's ``check``, ``model.check_target_modules``,
``data.check_rows``, ...), so ``check`` and ``train`` refuse exactly the same things. Nothing heavy is loaded:
the model is built on the meta device from its ``config.json``, and data rows are read and validated, not
tokenized. Each check gives one line: ok, warning, or error with the setting to change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
        return _run(findings, name, fn)

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
    output_ok = run("output", lambda: _check_output(cfg))
    if model_ok:
        run("quant", lambda: _check_quant(cfg))
        run("lora", lambda: _check_lora(cfg, holder))
        if output_ok:
            run("disk", lambda: _check_disk(cfg, holder, env))
        run("memory", lambda: _check_memory(config_path, overrides, launch_config, num_processes, env))
    return findings


def early_checks(cfg: RunConfig) -> list[Finding]:
    """The checks that need no library but torch (which loading the config imports): the launch against the
    run config, and what the file system says (the output folder and a finished run in it, the model folder,
    the data paths). ``train`` runs them before transformers, datasets or peft are imported, so a mistyped
    path or a launch that contradicts the run config is refused within seconds; :func:`run_checks` runs them
    again, in full."""
    findings: list[Finding] = []
    _run(findings, "launch", lambda: _check_launch(cfg, launch_env(None, None)))
    _run(findings, "output", lambda: _check_output(cfg))
    _run(findings, "model", lambda: _check_model_path(cfg))
    _run(findings, "data", lambda: _check_data_paths(cfg))
    return findings


def _run(findings: list[Finding], name: str, fn: Callable[[], str | tuple[str, str]]) -> bool:
    """Run one check into ``findings`` (a UserError is its error finding); False when it found an error."""
    try:
        result = fn()
    except UserError as e:
        findings.append(Finding("error", name, str(e)))
        return False
    level, message = result if isinstance(result, tuple) else ("ok", result)
    findings.append(Finding(level, name, message))
    return level != "error"


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
    from .model import count_params, linear_layer_names, lora_target_names, meta_model

    model = meta_model(cfg.model)
    holder["linear_names"] = linear_layer_names(model)
    holder["target_names"] = lora_target_names(model)  # NF4 MoE experts add theirs
    holder["meta_model"] = model
    holder["total_params"] = count_params(model)[1]
    n = holder["total_params"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return f"{cfg.model.name_or_path}: {model.config.model_type}, {size} parameters (from config.json, no weights)"


def _check_model_path(cfg: RunConfig) -> str:
    from .model import check_model_path

    local = check_model_path(cfg.model, remote_code=False)  # folder, config.json, weight files; None: a hub id
    return f"{local} is a model folder" if local is not None else f"{cfg.model.name_or_path}: a hub id"


def _check_data_paths(cfg: RunConfig) -> str:
    from .datafile import check_path

    for source in cfg.data.sources():
        check_path(Path(source.path))
    return "every data path exists"


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

    # all-linear: this model's real layer names; NF4 MoE experts are adapted besides (and need a linear target too)
    targets = resolve_targets(holder["meta_model"], cfg.lora)
    how = "all-linear: " if cfg.lora.target_modules == "all-linear" else ""
    experts = sorted(set(holder["target_names"]) - set(holder["linear_names"]))
    extra = f"; NF4 experts: {', '.join(experts)}" if experts else ""
    return f"targets {how}{', '.join(targets)} (linear layers: {', '.join(holder['linear_names'])}{extra})"


def _check_output(cfg: RunConfig) -> str:
    """``output.dir`` is a folder (or can be one) on a writable filesystem, and holds no finished run (unless
    ``output.overwrite``); nothing is created here."""
    from .lock import check_not_finished

    out = Path(cfg.output.dir).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir={cfg.output.dir} is a file, not a folder: choose another output.dir")
    check_not_finished(out, cfg.output.overwrite)
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:  # a real write: root passes every permission check, and /proc or a read-only mount refuse only this
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(
            f"output.dir={cfg.output.dir}: {existing} is not writable ({e.strerror}): choose a writable output.dir"
        ) from None
    return f"{out} is writable" if out.exists() else f"{out} will be created in {existing}"


def _check_disk(cfg: RunConfig, holder: dict, env: Mapping[str, str]) -> str | tuple[str, str]:
    """Free space against what the run writes: its checkpoints (adapter + optimizer state, ``keep_checkpoints``
    of them plus the one being written), the final adapter and, with ``output.merge``, the merged model in
    the dtype it will really have."""
    out = Path(cfg.output.dir).absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    merge_bytes, merge_dtype = _merged_bytes(cfg, holder["total_params"])
    ckpt = _checkpoint_bytes(cfg, _lora_params(cfg, holder["meta_model"]), env)
    kept = cfg.output.keep_checkpoints + 1
    need = merge_bytes + kept * ckpt + ckpt
    parts = [f"{kept} checkpoints of {_size(ckpt)}"]
    if cfg.output.merge:
        parts.insert(0, f"merged model {_size(merge_bytes)} in {merge_dtype}")
    message = f"{_size(free)} free at {existing}; about {_size(need)} needed ({', '.join(parts)}, the adapter)"
    if free < need:
        fixes = ["free some space", "choose another output.dir"]
        if cfg.output.keep_checkpoints > 1:
            fixes.append("lower output.keep_checkpoints")
        if cfg.output.merge:
            fixes.append("set output.merge=false (merge later with `qlora-dist merge`)")
        raise UserError(f"{message}: {', '.join(fixes[:-1])} or {fixes[-1]}")
    if free < 1.2 * need:
        return "warning", message + " (little headroom)"
    return message


def _merged_bytes(cfg: RunConfig, params: int) -> tuple[int, str]:
    """Bytes of the merged model and its dtype, resolved as the merge resolves it on this machine."""
    import torch

    from .merge import checkpoint_dtype

    name = cfg.output.merge_dtype
    if name == "auto":  # as the merge resolves it: the base checkpoint's own dtype, else the compute dtype
        stored = checkpoint_dtype(cfg.model.name_or_path)
        name = str(stored).removeprefix("torch.") if stored is not None else cfg.quant.compute_dtype
    if name == "auto":
        name = "bfloat16" if torch.cuda.is_available() else "float32"
    return (params * (4 if name == "float32" else 2) if cfg.output.merge else 0), name


def _lora_params(cfg: RunConfig, model) -> int:
    """Adapter parameters: r x (in + out) for every targeted linear layer of the meta model."""
    from torch import nn

    targets = cfg.lora.target_modules
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        hit = leaf not in ("lm_head", "embed_out", "output") if targets == "all-linear" else leaf in targets
        if hit:
            total += cfg.lora.r * (module.in_features + module.out_features)
    return total


def _checkpoint_bytes(cfg: RunConfig, lora_params: int, env: Mapping[str, str]) -> int:
    """One checkpoint: the fp32 adapter, the optimizer's two moments (1 byte each in 8-bit, else 4), and the
    fp32 master partitions DeepSpeed keeps; a little for the rest."""
    moments = 2 if "8bit" in cfg.train.optimizer else 8
    master = 4 if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else 0
    return lora_params * (4 + moments + master) + (1 << 20)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


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
