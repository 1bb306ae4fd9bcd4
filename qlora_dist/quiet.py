"""A quiet first contact: qlora_dist's own log lines, and the libraries' known noise silenced.

The command line and library use get the same set-up: one ``qlora-dist: ...`` line per event on the main
process (warnings only on the others), no progress bars from ``datasets``/``transformers``, and the warnings
that libraries print on every rank of every run about things the user cannot change (deprecations inside peft,
bitsandbytes' optional CPU kernels, paged optimizers on a CPU) filtered out. ``--debug`` (or
``QLORA_DIST_DEBUG=1``) keeps every library message.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("transformers", "datasets", "accelerate", "peft", "torch", "httpx", "matplotlib", "DeepSpeed")

KNOWN_WARNINGS = (
    # peft's get_peft_model reads the deprecated property itself (transformers >= 5.x); nothing to change here.
    r".*`is_gradient_checkpointing` is deprecated.*",
    r".*`gradient_checkpointing_enable` is deprecated.*",
    # bitsandbytes runs the unpaged optimizer on a CPU, and says so once per rank; the run logs it once.
    r".*Paged optimizers are not supported on CPU.*",
    r".*use_cache=True.*",
    # wandb/mlflow/tensorboard import-time notices about optional packages.
    r".*pkg_resources is deprecated.*",
)


def debug_requested() -> bool:
    """``--debug`` (the command line sets ``QLORA_DIST_DEBUG=1``, which launched workers inherit)."""
    return os.environ.get("QLORA_DIST_DEBUG", "") not in ("", "0")


def setup_logging(force: bool = True) -> None:
    """INFO on the main process, warnings only elsewhere, each line ``qlora-dist: ...``; libraries quieter.

    ``force=False`` (library use) leaves a logging set-up the user's script already made alone.
    """
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    if force:
        logging.basicConfig(level=level, format="qlora-dist: %(message)s", force=True)
    elif not logging.getLogger().handlers and not logging.getLogger("qlora_dist").handlers:
        # A script that configured no logging: our lines only, so its own logging stays its own.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("qlora-dist: %(message)s"))
        ours = logging.getLogger("qlora_dist")
        ours.addHandler(handler)
        ours.setLevel(level)
        ours.propagate = False
    debug = debug_requested()
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING if rank == 0 else logging.ERROR)
    # bitsandbytes warns at import that an optional CPU kernel package is missing; it falls back by itself.
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if debug else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    if not debug:
        for pattern in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def quiet_libraries() -> None:
    """transformers and datasets print per-shard progress bars and advisory warnings on every rank."""
    from .distributed import on_cpu

    if on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed's import warns that it found no GPU
    if debug_requested():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
