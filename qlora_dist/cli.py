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

from .errors import PeerExit, UserError

log = logging.getLogger("qlora_dist")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also come after options (qlora-dist plan RUN.yaml --gpus 8 data.max_length=2048).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    debug = args.debug or os.environ.get("QLORA_DIST_DEBUG", "") not in ("", "0")
    if debug:  # workers started by `demo` (or a launcher) inherit it: they keep the libraries' messages too
        os.environ["QLORA_DIST_DEBUG"] = "1"
    setup_logging()
    rank = int(os.environ.get("RANK", "0"))
    prefix = "qlora-dist: error" + (f" [rank {rank}]" if rank else "")
    try:
        return int(args.func(args) or 0)
    except PeerExit:
        from .preemption import failing

        failing()
        return 2  # another rank failed and printed why
    except UserError as e:
        _report_failure()
        if debug:
            raise
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlora-dist: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        peer = _peer_failure(e)
        _report_failure()
        if peer is None or debug:
            raise
        print(f"{prefix}: {peer}", file=sys.stderr)
        return 1


def _report_failure() -> None:
    from .preemption import failing

    failing()
    if "torch" in sys.modules:  # only a run that got as far as a process group has peers to tell
        from .distributed import report_failure

        report_failure()


def _peer_failure(error: BaseException) -> str | None:
    if "torch" not in sys.modules:
        return None
    from .distributed import peer_failure

    return peer_failure(error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-dist", description="Multi-GPU QLoRA fine-tuning.")
    from . import __version__

    parser.add_argument("--debug", action="store_true", help="show tracebacks and every library warning")
    parser.add_argument("--version", action="version", version=f"qlora-dist {__version__}")
    # --debug is accepted after the subcommand too (qlora-dist train RUN.yaml --debug).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and every library warning"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)  # type: ignore[method-assign]

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
    p.add_argument(
        "--merge-base",
        choices=["dequantized", "original"],
        default="dequantized",
        help="merge into the base dequantized from the NF4 weights the adapter was trained against (default), "
        "or into the original weights",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="dtype of the merged model (default auto: the compute dtype the adapter was trained in)",
    )
    p.add_argument("--data", help="data file whose first rows are the check sequences (default: random token ids)")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing the merged model with base + adapter (for models too large to load twice)",
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "check", help="check a run (config, launch, versions, model, data, disk, memory) without training"
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--launch-config", help="accelerate launch config to check against (default: single process)")
    p.add_argument("--num-processes", type=int, help="processes in total (default: the launch config's)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="memory per GPU (and host RAM per node) a run needs, from config.json only")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.micro_batch_size=2")
    p.add_argument("--launch-config", help="accelerate launch config: the strategy (default: DDP)")
    p.add_argument("--gpus", type=int, help="GPUs in total (default: the launch config's num_processes, or 1)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 24GiB (default: 80GiB)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="what auto dtypes mean (default: cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plugins", help="list data formats, strategies and callbacks, and where each comes from")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="load and validate a run config, print it resolved")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("slurm", help="write an sbatch script for a multi-node run that requeues itself when preempted")
    p.add_argument("config", help="run config YAML (paths are kept as given: relative to where you submit)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the run config")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate (one srun task each)")
    p.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs (= processes) per node; 0: CPU nodes, no GPU request"
    )
    p.add_argument(
        "--processes-per-node", type=int, help="processes per node (default: the node's GPUs; 1 on CPU nodes)"
    )
    p.add_argument("--launch-config", default="launch_configs/multi_gpu_ddp.yaml", help="accelerate launch config")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 or 1-12:00:00")
    p.add_argument("--account", help="SLURM account to charge (default: yours)")
    p.add_argument("--job-name", help="default: qlora-<config name>")
    p.add_argument("--cpus-per-task", type=int, help="CPUs for each node's task (data loading, the launcher)")
    p.add_argument("--signal-seconds", type=int, default=300, help="SIGUSR1 this long before the limit (300)")
    p.add_argument("--log-dir", default=".", help="folder of the %%x-%%j.out/.err logs; must exist (default: .)")
    p.add_argument(
        "--extra-sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="one more #SBATCH option, repeatable; write it with =, e.g. --extra-sbatch=--exclusive",
    )
    p.add_argument("--output", help="write the script here (default: print it)")
    p.set_defaults(func=cmd_slurm)
    return parser


def setup_logging() -> None:
    """INFO on the main process, warnings only elsewhere; quiet the libraries' own progress bars."""
    from .quiet import setup_logging as _setup

    _setup(force=True)


def cmd_train(args) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides)  # validated before anything heavy loads
    # One run per output folder (lock.py): a folder that exists is locked at once, so a second run is refused
    # in a second; a new one is created only once the preflight checks below pass (nothing half-written).
    main = int(os.environ.get("RANK", "0")) == 0
    if main and Path(config.output.dir).is_dir():
        from .lock import acquire

        acquire(Path(config.output.dir))
    # The preflight checks, once per machine (the other local ranks would only repeat them). A failure ends
    # this process, and the launcher then stops the others. The cheap ones first: a missing data file, model
    # folder or a launch contradicting the run config is refused before the heavy libraries are imported.
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        from .doctor import early_checks, run_checks

        _refuse_on_errors(early_checks(config))
        _quiet_libraries()
        _refuse_on_errors(run_checks(args.config, args.overrides, config=config))
    else:
        _quiet_libraries()
    from .train import train

    report = train(config)
    if report is not None:
        log.info("done: %s", Path(config.output.dir) / "run_report.json")
    return 0


def _refuse_on_errors(findings) -> None:
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise UserError(
            "; ".join(f"{f.check}: {f.message}" for f in errors) + " (run `qlora-dist check` for all checks)"
        )


def cmd_check(args) -> int:
    _quiet_libraries()
    from .doctor import print_findings, run_checks

    findings = run_checks(args.config, args.overrides, args.launch_config, args.num_processes)
    print_findings(findings)
    return 1 if any(f.level == "error" for f in findings) else 0


def cmd_plan(args) -> int:
    _quiet_libraries()
    from .plan import plan_command

    print(
        plan_command(
            args.config, args.overrides, args.gpus, args.gpu_memory, args.launch_config, args.device, args.json
        )
    )
    return 0


def cmd_plugins(args) -> int:
    from .callbacks import CALLBACKS
    from .formats import FORMATS, get_format
    from .strategies import STRATEGIES

    get_format("text")  # registers the built-in formats
    from .strategies import user_facing_strategies

    for registry in (FORMATS, STRATEGIES, CALLBACKS):
        print(f"{registry.kind} (entry point group {registry.group}):")
        # Strategies by the names train.strategy and the report use (zero2/zero3, not the DeepSpeed factory).
        rows = user_facing_strategies() if registry is STRATEGIES else registry.available()
        for name, source in rows:
            print(f"  {name:<20} {source}")
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

    merge_command(
        args.base, args.adapter, Path(args.out), args.merge_base, args.dtype, verify=args.verify, data=args.data
    )
    return 0


def cmd_slurm(args) -> int:
    from .slurm import SlurmJob, sbatch_script

    job = SlurmJob(
        config=args.config,
        overrides=args.overrides,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        processes_per_node=args.processes_per_node,
        launch_config=args.launch_config,
        partition=args.partition,
        time=args.time,
        account=args.account,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        cpus_per_task=args.cpus_per_task,
        log_dir=args.log_dir,
        extra_sbatch=args.extra_sbatch,
    )
    script = sbatch_script(job)
    if args.output is None:
        print(script, end="")
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    out.chmod(0o755)
    log.info("wrote %s: submit it with sbatch %s", out, out)
    return 0


def _quiet_libraries() -> None:
    from .quiet import quiet_libraries

    quiet_libraries()
