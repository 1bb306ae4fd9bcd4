"""``qlora-dist``: the command line.

Every command turns a :class:`UserError` into one short message on stderr and exit status 2; ``--debug``
(or ``QLORA_DIST_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import UserError

log = logging.getLogger("qlora_dist")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("QLORA_DIST_DEBUG", "") not in ("", "0")
    setup_logging()
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if debug:
            raise
        rank = int(os.environ.get("RANK", "0"))
        prefix = "qlora-dist: error" + (f" [rank {rank}]" if rank else "")
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlora-dist: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-dist", description="Multi-GPU QLoRA fine-tuning.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a run config (run under accelerate launch for several processes)")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="build a tiny model and train it on 2 processes, end to end, offline")
    p.add_argument("--output", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--num-processes", type=int, default=None, help="processes to launch (default: 2)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo's run config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base and save a plain transformers model")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--adapter", required=True, help="adapter folder (peft format)")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("validate", help="load and validate a run config, print it resolved")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_validate)
    return parser


def setup_logging() -> None:
    """INFO on the main process, warnings only elsewhere; quiet the libraries' own progress bars."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="qlora-dist: %(message)s", force=True
    )
    for noisy in ("transformers", "datasets", "accelerate", "peft", "torch", "httpx", "matplotlib", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    # bitsandbytes warns at import that an optional CPU kernel package is missing; it falls back by itself.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def cmd_train(args) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides)  # validated before anything heavy loads
    _quiet_libraries()
    from .train import train

    report = train(config)
    if report is not None:
        log.info("done: %s", Path(config.output.dir) / "run_report.json")
    return 0


def cmd_validate(args) -> int:
    from .config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_demo(args) -> int:
    _quiet_libraries()
    from .demo import run_demo

    return run_demo(Path(args.output), args.num_processes, args.overrides)


def cmd_merge(args) -> int:
    _quiet_libraries()
    from .merge import merge_command

    merge_command(args.base, args.adapter, Path(args.out), args.merge_base, args.dtype)
    return 0


def _quiet_libraries() -> None:
    """transformers and datasets print per-shard progress bars and advisory warnings on every rank."""
    import warnings

    from .distributed import on_cpu

    if on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed's import warns that it found no GPU
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    warnings.filterwarnings("ignore", message=".*use_cache=True.*")
