"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, ...) through accelerate's own tracking.

``train.report_to`` becomes ``Accelerator(log_with=...)``; :func:`start` opens the tracker run with the resolved
run config as its hyperparameters (nothing from the environment, so no tokens or secrets), and :func:`log`
sends every ``metrics.jsonl`` row under its optimizer step. accelerate does both on the main process only.

A resumed run continues the same tracker run where the tracker can: the W&B run id and the MLflow run id live
in the checkpoint's ``state.json`` (``TrainState.trackers``); TensorBoard keeps writing into the same folder,
``output.dir/runs/<train.project>/``, and purges the events of steps that are being done again.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

KNOWN_TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab")
"""The trackers accelerate integrates (``accelerate.utils.LoggerType``, without ``all``)."""

METRIC_NAMES = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "epoch": "train/epoch",
    "eval_loss": "eval/loss",
}
"""``metrics.jsonl`` field -> tracker metric name."""


def check_tracker_names(names: list[str]) -> None:
    """Refuse a ``train.report_to`` entry accelerate does not know (a config error, before anything loads)."""
    for i, name in enumerate(names):
        if name not in KNOWN_TRACKERS:
            raise ConfigError(
                f"train.report_to[{i}]={name!r} is not a tracker: choose from {' | '.join(KNOWN_TRACKERS)}"
            )


def check_installed(names: list[str]) -> None:
    """One line naming the extra to install when a tracker's package is missing (accelerate would drop it)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise UserError(
                f"train.report_to={name} needs the {name} package, which is not installed: "
                f"pip install 'qlora-dist[{name}]' (or remove {name} from train.report_to)"
            )


def accelerator_kwargs(names: list[str], output_dir: Path) -> dict[str, Any]:
    """``Accelerator`` arguments for ``names``: trackers, and ``output.dir/runs`` as their logging folder."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    check_installed(names)
    config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "runs"))
    return {"log_with": list(names), "project_config": config}


def hyperparameters(config) -> dict[str, Any]:
    """The resolved run config, flattened to ``section/key`` -> scalar (what every tracker accepts)."""
    flat: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (bool, int, float, str)):
                flat[f"{section}/{key}"] = value
            else:  # lists, None, nested sources: as JSON text
                flat[f"{section}/{key}"] = json.dumps(value)
    return flat


def start(accelerator, config, ids: dict[str, str], resume_step: int = 0) -> dict[str, str]:
    """Open (or, with ``ids`` from a checkpoint, reopen) the tracker runs; returns the ids to keep in checkpoints.

    Call on every rank once the resume decision is made; accelerate starts the trackers on the main process only.
    """
    names = config.train.report_to
    if not names:
        return dict(ids)
    ids = dict(ids)
    run_name = config.train.run_name or Path(config.output.dir).resolve().name
    init_kwargs: dict[str, dict[str, Any]] = {}
    tb_dir = Path(config.output.dir) / "runs" / config.train.project
    if "tensorboard" in names and not resume_step and accelerator.is_main_process and tb_dir.is_dir():
        # A fresh start in this folder (output.overwrite, or a run that died before its first checkpoint): the
        # earlier run's events would mix with this one's step by step.
        log.info("trackers: fresh start, removing the earlier TensorBoard events in %s", tb_dir)
        shutil.rmtree(tb_dir)
    if "tensorboard" in names and resume_step:
        # Steps after the checkpoint are done again: drop what an interrupted run logged for them.
        init_kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    if "wandb" in names:
        ids.setdefault("wandb", secrets.token_hex(8))
        init_kwargs["wandb"] = {"name": run_name, "id": ids["wandb"], "resume": "allow", "dir": config.output.dir}
    if "mlflow" in names:
        init_kwargs["mlflow"] = {"run_name": run_name, "run_id": ids.get("mlflow")}
    if resume_step and ids:
        log.info("trackers: continuing run(s) %s", ", ".join(f"{k} {v}" for k, v in sorted(ids.items())))
    try:
        accelerator.init_trackers(config.train.project, config=hyperparameters(config), init_kwargs=init_kwargs)
    except Exception as e:  # the tracker's own set-up (a tracking URI, a login): its message says what to fix
        first = (str(e).strip().splitlines() or [""])[0][:400]
        raise UserError(f"train.report_to: starting {', '.join(names)} failed: {type(e).__name__}: {first}") from e
    if "mlflow" in names and accelerator.is_main_process:
        ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    return ids


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` row under their tracker names (missing and null values left out)."""
    return {METRIC_NAMES[k]: float(v) for k, v in row.items() if k in METRIC_NAMES and v is not None}


def log_row(accelerator, row: dict[str, Any]) -> None:
    """Send one ``metrics.jsonl`` row to every tracker, under its optimizer step (main process only)."""
    if accelerator.trackers:
        accelerator.log(tracker_values(row), step=int(row["step"]))


def finish(accelerator) -> None:
    """Close the tracker runs (flush event files, end the W&B/MLflow run) without leaving the process group."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
