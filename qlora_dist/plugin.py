"""The library face of qlora_dist: config in, ready pieces out, for your own accelerate script.

::

    plugin = QLoRAPlugin.from_yaml("run.yaml")
    accelerator = plugin.make_accelerator()
    model, tokenizer = plugin.load_model(accelerator)
    train_data, eval_data = plugin.load_data(accelerator, tokenizer)
    optimizer = plugin.make_optimizer(model)
    scheduler = plugin.make_scheduler(optimizer, total_steps)
    model, optimizer = plugin.prepare(accelerator, model, optimizer)
    ...  # your own loop; plugin.epoch_steps(...) yields this rank's shard, step by step;
         # plugin.train_step(...) or plugin.loss_scale(...) normalise the loss as qlora-dist train does
    plugin.finish(accelerator, model, tokenizer)

``qlora-dist train`` is built from exactly these pieces (see ``train.py``), so the library and the ready
entry point cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import attention, balance, base_cache, checkpoint, lock, preemption, quiet
from . import data as data_mod
from . import model as model_mod
from . import trackers as tracker_mod
from .callbacks import Callbacks, Event
from .config import RunConfig, from_dict, load_config
from .distributed import (
    all_reduce_sum,
    broadcast_int,
    gather_objects,
    leave_process_group,
    make_accelerator,
    on_cpu,
    peak_memory_bytes,
)
from .errors import PeerExit, UserError
from .fsutil import disk_errors, replace_dir
from .merge import QUANT_META, NF4Rebuild, checkpoint_dtype, logits_of, loss_of, merge_trained
from .quant import coverage
from .report import write_json, write_text_atomic
from .strategies import Strategy, resolve_strategy

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where tokenized data sets are cached: ``$QLORA_DIST_CACHE`` or ``~/.cache/qlora_dist``."""
    return Path(os.environ.get("QLORA_DIST_CACHE", "~/.cache/qlora_dist")).expanduser()


class QLoRAPlugin:
    """Builds every QLoRA piece of a distributed run from one :class:`RunConfig`, and keeps the measured facts
    (checksums, synced bytes, timings) that end up in ``run_report.json``."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config.validate()
        self.output_dir = Path(config.output.dir)
        # The launch decides the strategy; a contradicting run config fails here, before anything loads.
        self.strategy: Strategy = resolve_strategy(self.config)
        # Callback plugins load now: a broken one fails this run before anything heavy, and only runs naming it.
        self.callbacks = Callbacks(self.config.train.callbacks)
        self.facts: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._prepared = False  # whether prepare() wrapped the model (the comm counters are attached)
        self.compute_dtype: torch.dtype | None = None  # known once there is an accelerator (its device)
        self.tracker_ids: dict[str, str] = {}
        # Predicted micro-batch work for data.balance_tokens: padded tokens until load_model reads the model's.
        self.step_cost = balance.StepCost()
        # Library use gets the command line's quiet set-up, without replacing a logging set-up of its own.
        quiet.setup_logging(force=False)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> QLoRAPlugin:
        """From a run-config YAML file plus ``section.key=value`` overrides."""
        return cls(load_config(path, overrides))

    @classmethod
    def from_kwargs(cls, **sections: dict[str, Any]) -> QLoRAPlugin:
        """From keyword arguments, one mapping per section: ``from_kwargs(model={...}, data={...})``."""
        return cls(from_dict(sections))

    # -- the pieces ---------------------------------------------------------------------------------------

    def make_accelerator(self, **kwargs: Any):
        """An Accelerator with the right backend (NCCL, or gloo on a CPU-only machine), checked world size.

        Rank 0 first takes the output folder's lock (one run per ``output.dir``, see ``lock.py``) and holds it
        until the process ends; a second run into the same folder is refused here, before anything loads.
        """
        model_mod.check_model_path(self.config.model)
        if int(os.environ.get("RANK", "0")) == 0:
            self._lock = lock.acquire(self.output_dir)
        lock.check_not_finished(self.output_dir, self.config.output.overwrite)
        quiet.quiet_libraries()
        trackers = tracker_mod.accelerator_kwargs(self.config.train.report_to, self.output_dir)
        accelerator = make_accelerator(**{**self.strategy.accelerator_kwargs(on_cpu()), **trackers, **kwargs})
        self.compute_dtype = model_mod.resolve_dtype(self.config.quant.compute_dtype, accelerator.device)
        optimizer = self.strategy.optimizer_name(self.config.train.optimizer)
        if on_cpu() and accelerator.is_main_process and optimizer.startswith("paged"):
            log.info("paged optimizers need CUDA: on this CPU bitsandbytes runs %s unpaged", optimizer)
        return accelerator

    def load_tokenizer(self):
        """The run's tokenizer, with a pad token."""
        return model_mod.load_tokenizer(self.config.model)

    def load_model(self, accelerator, tokenizer=None) -> tuple[torch.nn.Module, Any]:
        """The NF4 base on this process's device, frozen, checkpointed, with LoRA attached; and its tokenizer."""
        cfg = self.config
        if self.compute_dtype is None:  # an Accelerator the user made: its device decides what auto means
            self.compute_dtype = model_mod.resolve_dtype(cfg.quant.compute_dtype, accelerator.device)
        tokenizer = tokenizer if tokenizer is not None else self.load_tokenizer()
        quant = dataclasses.replace(cfg.quant, storage_dtype=self.strategy.storage_dtype(cfg, self.compute_dtype))
        self.quant = quant
        # Not QLoRA (too little of the base would be 4-bit): refused before a weight is read.
        predicted, model_type = coverage.predict_for(cfg.model, quant, self.compute_dtype)
        coverage.require_qlora(predicted, model_type, quant.allow_unquantized, "predicted from config.json")
        device_map = self.strategy.device_map(accelerator.device)
        # Packed rows: attention per example instead of a block-diagonal mask over the whole row.
        attn = attention.register() if cfg.data.packing else None

        def load(path: str) -> torch.nn.Module:
            model_cfg = dataclasses.replace(cfg.model, name_or_path=path)
            return model_mod.load_quantized_model(
                model_cfg,
                quant,
                accelerator.device,
                self.compute_dtype,
                device_map=device_map,
                attn_implementation=attn,
            )

        cache_root, not_cached = self._base_cache_root()
        base, how = base_cache.load_base(
            load,
            cfg.model.name_or_path,
            model_mod.check_model_path(cfg.model),
            quant,
            self.compute_dtype,
            accelerator.device,
            cache_root,
            accelerator.is_local_main_process,
            accelerator.wait_for_everyone,
            not_cached,
        )
        self.facts["base_load"] = base_cache.report(how)
        # ...and measured on what was loaded: the figure the report gives, and the same rule applied to it.
        self.coverage = coverage.measure(base)
        coverage.require_qlora(self.coverage, model_type, quant.allow_unquantized, "measured on the loaded model")
        self.facts["base_checksum_before"] = model_mod.base_checksum(base, self.strategy.gathered)
        base_cache.verify(how, self.facts["base_checksum_before"])  # a cached base must be what was quantized
        if cfg.train.gradient_checkpointing:
            model_mod.enable_gradient_checkpointing(base)
        # Seed right before LoRA init so every rank starts from the same adapter weights.
        torch.manual_seed(cfg.train.seed)
        model = model_mod.attach_lora(base, cfg.lora)
        # What a micro-batch of this model costs, for the token-balanced split (the same on every rank).
        self.step_cost = balance.StepCost.of_config(base.config, accelerator.device.type)
        trainable, total = model_mod.count_params(model)
        self.facts.update(
            trainable_params=trainable,
            total_params=total,
            trainable_grad_bytes=model_mod.trainable_grad_bytes(model),
            # What a full fine-tune of the base would all-reduce: a gradient for every base weight (fp32).
            full_grad_bytes=(total - trainable) * 4,
        )
        return model, tokenizer

    def _base_cache_root(self) -> tuple[Path | None, str | None]:
        """Where the quantized base is cached, or (None, why it is not)."""
        if not self.config.quant.cache:
            return None, "quant.cache is false"
        root = Path(self.config.quant.cache_dir).expanduser() if self.config.quant.cache_dir else None
        return root or default_cache_dir() / "nf4", None

    def load_data(self, accelerator, tokenizer):
        """Tokenized (train, eval) data sets; the local main process tokenizes first, the others read its cache.

        Rows have ``input_ids``, ``labels`` (-100 where no loss is taken), ``num_tokens`` (labels that count),
        ``position_ids`` when packing, and ``source`` (index into ``data.datasets``) when mixing unpacked.
        Several ``data.datasets`` are mixed by weight into one training set; the per-source counts go into the
        report (``data_sources``)."""
        train, held_out, sources = data_mod.prepare_sources(
            self.config.data,
            tokenizer,
            seed=self.config.train.seed,
            cache_dir=default_cache_dir() / "tokenized",
            is_main_process=accelerator.is_local_main_process,
            wait_for_everyone=accelerator.wait_for_everyone,
        )
        self.facts["data_sources"] = sources
        return train, held_out

    def make_scheduler(self, optimizer, total_steps: int):
        """The learning-rate schedule of ``train.lr_scheduler``: linear warmup over ``train.warmup_ratio`` of
        ``total_steps`` optimizer steps, then cosine, linear or constant. Call ``scheduler.step()`` per step."""
        from .train import make_scheduler

        t = self.config.train
        return make_scheduler(optimizer, t.lr_scheduler, math.ceil(t.warmup_ratio * total_steps), total_steps)

    def loss_scale(self, accelerator, micro_batches: list[dict]) -> tuple[float, float]:
        """(factor, global label tokens) for one optimizer step: multiply each micro-batch's *summed* token loss
        by the factor before backward, and 2 ranks x micro-batch b train exactly like 1 rank x 2b. Every rank
        calls it once per step (one small all-reduce). See :func:`qlora_dist.train.loss_scale`."""
        from .train import loss_scale

        return loss_scale(micro_batches, accelerator)

    def train_step(self, accelerator, model, micro_batches: list[dict]) -> tuple[float, int]:
        """Forward and backward over one optimizer step's micro-batches with qlora-dist train's own loss
        (token cross-entropy, normalised by :meth:`loss_scale`); returns (global mean loss, real tokens over all
        ranks). Then call ``plugin.strategy.step(...)`` and ``scheduler.step()``."""
        from .train import loss_chunk_tokens, train_step

        chunk = loss_chunk_tokens(self.config.train)
        loss, tokens, _ = train_step(model, micro_batches, accelerator, self.strategy, chunk_tokens=chunk)
        return loss, tokens

    def evaluate(self, accelerator, model, eval_data, pad_id: int) -> float:
        """Token-mean loss over ``eval_data``, each rank taking its share (every rank calls this)."""
        from .train import evaluate, loss_chunk_tokens

        t = self.config.train
        return evaluate(model, eval_data, accelerator, t.micro_batch_size, pad_id, loss_chunk_tokens(t))

    # -- experiment trackers ------------------------------------------------------------------------------

    def start_trackers(self, accelerator, state=None) -> None:
        """Open the runs of ``train.report_to`` (after :meth:`resume`, with its ``state``: a resumed run
        continues the same tracker runs, their ids being kept in the checkpoints)."""
        ids = dict(state.trackers) if state is not None else {}
        self.tracker_ids = tracker_mod.start(accelerator, self.config, ids, resume_step=state.step if state else 0)
        if state is not None:
            state.trackers = self.tracker_ids

    def log_metrics(self, accelerator, row: dict[str, Any]) -> None:
        """Send a metrics row (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``eval_loss``) to
        the trackers under its step, as ``train/loss``, ``train/lr``, ..., ``eval/loss`` (main process only)."""
        tracker_mod.log_row(accelerator, row)

    def finish_trackers(self, accelerator) -> None:
        """Close the tracker runs (``accelerator.end_training()`` does this too)."""
        tracker_mod.finish(accelerator)

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The configured optimizer over the trainable (adapter) parameters only."""
        params = [p for p in model.parameters() if p.requires_grad]
        t = self.config.train
        name = self.strategy.optimizer_name(t.optimizer)
        self.facts["optimizer"] = name
        if name != t.optimizer:
            log.info(
                "train.optimizer=%s cannot run under this launch (%s): using %s instead",
                t.optimizer,
                self.strategy.name,
                name,
            )
        if name == "adamw":
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        if name == "deepspeed_cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=True)
        import bitsandbytes as bnb

        cls = {
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
            "adamw_8bit": bnb.optim.AdamW8bit,
        }[name]
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)

    def prepare(self, accelerator, model, optimizer):
        """Wrap model and optimizer for the strategy (DDP or a DeepSpeed engine) and start counting the bytes
        its collectives move."""
        t = self.config.train
        self._prepared = True
        return self.strategy.prepare(accelerator, model, optimizer, t.micro_batch_size, t.grad_accum, t.max_grad_norm)

    def steps_per_epoch(self, num_examples: int, world_size: int) -> int:
        """Optimizer steps in one epoch of ``num_examples`` sharded over ``world_size`` ranks."""
        t = self.config.train
        per_rank = num_examples // world_size
        if per_rank == 0:
            raise UserError(
                f"data.path={self.config.data.path or ', '.join(s.path for s in self.config.data.datasets)}: "
                f"{num_examples} training examples for {world_size} processes"
            )
        return math.ceil(math.ceil(per_rank / t.micro_batch_size) / t.grad_accum)

    def epoch_steps(
        self, dataset, epoch: int, rank: int, world_size: int, pad_id: int, start: int = 0
    ) -> Iterator[list[dict]]:
        """This rank's batches for ``epoch``, grouped per optimizer step (``grad_accum`` micro-batches each),
        from global position ``start`` of the epoch's order (examples already consumed, for a resumed run)."""
        t = self.config.train
        # Length grouping permutes the order in whole global batches, so 2 ranks x b still see what 1 x 2b sees.
        lengths = data_mod.example_lengths(dataset) if self.config.data.group_by_length else None
        global_batch = t.micro_batch_size * t.grad_accum * world_size
        if self.config.data.balance_tokens:  # the same examples per step, placed over ranks by tokens
            steps = data_mod.balanced_step_batches(
                len(dataset), t.seed, epoch, rank, world_size, t.micro_batch_size, t.grad_accum,
                lengths or data_mod.example_lengths(dataset), start=start, group_lengths=lengths,
                labelled=data_mod.example_label_counts(dataset), cost=self.step_cost,
            )  # fmt: skip
            for micro in steps:
                yield [self._batch(dataset, idx, pad_id) for idx in micro]
            return
        indices = data_mod.rank_indices(
            len(dataset), t.seed, epoch, rank, world_size, start=start, lengths=lengths, global_batch=global_batch
        )
        micro = [indices[i : i + t.micro_batch_size] for i in range(0, len(indices), t.micro_batch_size)]
        for s in range(0, len(micro), t.grad_accum):
            yield [self._batch(dataset, idx, pad_id) for idx in micro[s : s + t.grad_accum]]

    def examples_in_step(self, dataset, start: int, world_size: int) -> int:
        """Examples (all ranks together) the optimizer step at epoch position ``start`` consumes: add it to
        ``epoch_position`` after each step. Not ``world_size x`` this rank's rows: with ``data.balance_tokens``
        the ranks take different numbers of examples."""
        t = self.config.train
        return data_mod.examples_in_step(
            len(dataset), start, t.micro_batch_size * t.grad_accum * world_size, world_size
        )

    @staticmethod
    def _batch(dataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        batch = data_mod.collate([dataset[i] for i in indices], pad_id)
        batch["index"] = torch.tensor(indices)  # which examples these are: the run reports its data shards
        return batch

    # -- the end ------------------------------------------------------------------------------------------

    def finish(self, accelerator, model, tokenizer, stats: dict[str, Any] | None = None, check_batches=None):
        """Save the adapter, gather per-rank facts, merge on rank 0, write ``run_report.json``.

        Everything that needs every rank (the QLoRA model's reference logits, checksums over the gathered base,
        the gathered adapter under ZeRO-3) happens first; then the other ranks return, so they never wait on a
        collective while rank 0 merges. Rank 0 merges by streaming the base's safetensors shards, re-quantizing
        each weight as training did, so no base weight is gathered. Returns the report on rank 0, else None.
        """
        cfg, stats, strategy = self.config, stats or {}, self.strategy
        main = accelerator.is_main_process
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        check_batches = check_batches or []
        from .train import loss_chunk_tokens

        # The QLoRA model's (NF4 base + adapter) logits and next-token loss (the training loss function, as the
        # run chunks it): what the merged model must reproduce.
        chunk = loss_chunk_tokens(cfg.train)
        reference = logits_of(unwrapped, check_batches) if cfg.output.merge else []
        reference_loss = loss_of(unwrapped, check_batches, chunk) if cfg.output.merge and check_batches else None
        per_rank = gather_objects(
            {
                "base_checksum_after": model_mod.base_checksum(unwrapped, strategy.gathered),
                "lora_checksum": model_mod.lora_checksum(unwrapped, strategy.gathered),
                "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                "base_bytes": model_mod.local_base_bytes(unwrapped),
                "base_load": self.facts.get("base_load"),
                # Before anything below gathers: only the training loop's collectives are timed. Not measured
                # (None) when the model was wrapped without plugin.prepare: nothing counted it.
                "comm_seconds": getattr(strategy, "comm_seconds", lambda: None)() if self._prepared else None,
                "indices": stats.get("indices_first_epoch", []),
            }
        )
        adapter_state = self._adapter_state(unwrapped, keep=main)
        merge_dtype = self._merge_dtype(accelerator.device)
        dequantized = None
        if cfg.output.merge and cfg.output.merge_base == "dequantized":
            # Rank 0 rebuilds the trained-against NF4 weights from the checkpoint files: nothing to gather.
            dequantized = NF4Rebuild.of(self.quant, self.compute_dtype, accelerator.device, unwrapped)
            load = self.facts.get("base_load") or {}
            if load.get("source") in ("cache", "built") and load.get("cache_dir"):
                # The packed weights this rank trained on: dequantized by the merge, not quantized again.
                dequantized = dataclasses.replace(dequantized, cache=Path(load["cache_dir"]))
        # Every rank leaves the process group together, before rank 0 merges: no collective can then wait (or
        # time out) during the merge, and no rank exits while its peers still hold connections to it (gloo
        # aborted at exit in that state, intermittently).
        leave_process_group(accelerator)
        if not main:
            return None

        adapter_dir = self.output_dir / "adapter"
        # Written whole into adapter.tmp, then renamed: a full disk never leaves a partial adapter/ behind.
        with disk_errors("the adapter", adapter_dir):
            tmp = adapter_dir.with_name("adapter.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(tmp, state_dict=adapter_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            # Record the 4-bit settings the adapter was trained against, so a later `qlora-dist merge` can
            # rebuild the same dequantized base.
            write_json(
                tmp / QUANT_META, {"quant": dataclasses.asdict(self.quant), "compute_dtype": _name(self.compute_dtype)}
            )
            replace_dir(tmp, adapter_dir)
        steps = stats.get("steps") or 0
        # accelerator.prepare instead of plugin.prepare: the counters never saw the collectives. null, not 0.
        # The counters only saw this launch's steps: a resumed run divides by those, not by every step of the run.
        launch_steps = steps - (stats.get("resumed_from_step") or 0)
        counted = launch_steps > 0 and self._prepared
        comm = strategy.comm_bytes()
        report: dict[str, Any] = {
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "strategy": strategy.name,
            "device": accelerator.device.type,
            "compute_dtype": _name(self.compute_dtype),
            "quant_storage_dtype": self.quant.storage_dtype,
            # Measured on the loaded base: the share of the decoder weights really held in 4-bit.
            "quantized_fraction": round(self.coverage.fraction, 6),
            "quantization": self.coverage.to_report(self.quant.allow_unquantized),
            "optimizer": self.facts.get("optimizer"),
            **{
                k: self.facts[k]
                for k in ("trainable_params", "total_params", "trainable_grad_bytes", "full_grad_bytes")
            },
            "grad_sync_bytes_per_step": comm["grad_sync"] // launch_steps if counted else None,
            "param_gather_bytes_per_step": comm["param_gather"] // launch_steps if counted else None,
            "optimizer_gather_bytes_per_step": comm["optimizer_gather"] // launch_steps if counted else None,
            "comm_seconds_per_step": [
                None if r["comm_seconds"] is None or not counted else r["comm_seconds"] / launch_steps for r in per_rank
            ],
            "base_checksum_before": self.facts["base_checksum_before"],
            "base_checksum_after": [r["base_checksum_after"] for r in per_rank],
            "lora_checksum_per_rank": [r["lora_checksum"] for r in per_rank],
            "examples_per_rank": [len(r["indices"]) for r in per_rank] if any(r["indices"] for r in per_rank) else None,
            # The prediction data.balance_tokens placed the examples by (null: the count split).
            "balance_cost": dataclasses.asdict(self.step_cost) if cfg.data.balance_tokens else None,
            "data_shards": shard_facts([r["indices"] for r in per_rank], stats.get("num_examples")),
            "data_sources": self.facts.get("data_sources"),
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in per_rank],
            "base_bytes_per_rank": [r["base_bytes"] for r in per_rank],
            "base_load_per_rank": [r["base_load"] for r in per_rank],
        }
        report.update({k: v for k, v in stats.items() if k not in ("examples_first_epoch", "indices_first_epoch")})
        report["merge"] = None
        if cfg.output.merge:
            # A SIGTERM now is noted, not obeyed: rank 0 is alone (the launcher may still SIGKILL it after its
            # grace period; merged.tmp is all that is then left, and the same command merges again).
            with preemption.phase(preemption.MERGE), disk_errors("the merged model", self.output_dir / "merged"):
                report["merge"] = merge_trained(
                    adapter_dir,
                    dequantized,
                    cfg.model.name_or_path,
                    self.output_dir / "merged",
                    merge_dtype,
                    tokenizer,
                    check_batches,
                    reference,
                    cfg.model.trust_remote_code,
                    rank=accelerator.process_index,
                    check_device=accelerator.device,
                    reference_dtype=self.compute_dtype,
                    reference_loss=reference_loss,
                    chunk_tokens=chunk,
                )
        report["wall_time_s"] = round(time.perf_counter() - self._start, 3)
        write_json(self.output_dir / "run_report.json", report)
        checkpoint.write_marker(self.output_dir, checkpoint.DONE, {"step": steps})
        self.callbacks.fire(self._event("on_run_end", accelerator, steps, report=report))
        if report["merge"] is not None and report["merge"]["path"] is None:
            raise UserError(
                f"merge check failed: relative logit error {report['merge']['rel_logit_error']:.3g} over the bound "
                f"{report['merge']['bound']:g}, so no merged/ was written; the adapter is in {adapter_dir} "
                "(run_report.json has the figures)"
            )
        return report

    def _adapter_state(self, model, keep: bool) -> dict[str, torch.Tensor]:
        """The adapter's weights, whole (gathered under ZeRO-3), as CPU copies; empty where not ``keep``.

        A ZeRO-3 adapter read without gathering has 0-sized tensors and would save as an empty adapter:
        refuse that rather than write it.
        """
        from peft import get_peft_model_state_dict

        trainable = [p for p in model.parameters() if p.requires_grad]
        with self.strategy.gathered(trainable):
            state = (
                {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()} if keep else {}
            )
        empty = [k for k, v in state.items() if v.numel() == 0]
        if keep and (not state or empty):
            raise RuntimeError(f"adapter state has empty tensors (not gathered?): {empty[:3]}")
        return state

    def _merge_dtype(self, device: torch.device) -> torch.dtype:
        if self.config.output.merge_dtype == "auto":  # the base checkpoint's own dtype: the merge is its size
            return checkpoint_dtype(self.config.model.name_or_path) or self.compute_dtype
        return model_mod.resolve_dtype(self.config.output.merge_dtype, device)

    def write_resolved_config(self, accelerator, fresh: bool = True) -> None:
        """Rank 0 writes the resolved config (every default filled in) into the output folder. A fresh start
        clears the markers; with ``output.overwrite=true`` it also removes the earlier run's checkpoints (the
        only way they are ever deleted but for pruning past ``keep_checkpoints``); ``unusable/`` is kept."""
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if fresh:
                checkpoint.clear_markers(self.output_dir)
                root = checkpoint.checkpoints_dir(self.output_dir)
                old = checkpoint.step_dirs(root) if self.config.output.overwrite else []
                if old:
                    log.warning("output.overwrite=true: starting over, deleting %s", ", ".join(p.name for p in old))
                for leftover in [*old, *root.glob(".tmp-step-*")]:
                    shutil.rmtree(leftover, ignore_errors=True)
            else:
                (self.output_dir / checkpoint.PREEMPTED).unlink(missing_ok=True)
            with disk_errors("the resolved config", self.output_dir / "config.yaml"):
                write_text_atomic(self.output_dir / "config.yaml", self.config.to_yaml())

    # -- checkpoints --------------------------------------------------------------------------------------

    def find_checkpoint(self, accelerator=None) -> Path | None:
        """The checkpoint to resume from (``train.resume: auto``), or None to start over.

        Rank 0 alone decides (it verifies the checkpoints and moves unusable ones aside) and broadcasts its
        choice, so every rank loads exactly the one rank 0 picked, even while the folder changes. Without an
        ``accelerator`` (a single process) this process decides. Raises a UserError when checkpoints exist and
        none verifies, or with ``train.resume=never`` and checkpoints present, unless ``output.overwrite``.
        """
        main = accelerator is None or accelerator.is_main_process
        choice, error = -1, None
        if main:
            try:
                found = self._choose_checkpoint()
                choice = -1 if found is None else int(found.name[5:])
            except UserError as e:
                choice, error = -2, e
        if accelerator is not None:
            choice = broadcast_int(choice, accelerator.device)
        if error is not None:
            raise error
        if choice == -2:  # rank 0 refused and says why; the others leave quietly
            raise PeerExit("rank 0 refused the checkpoints")
        return None if choice < 0 else checkpoint.checkpoints_dir(self.output_dir) / f"step-{choice}"

    def _choose_checkpoint(self) -> Path | None:
        root = checkpoint.checkpoints_dir(self.output_dir)
        if not checkpoint.step_dirs(root) or self.config.output.overwrite:
            return None
        if self.config.train.resume == "never":
            raise UserError(
                f"train.resume=never but {root} holds checkpoints: set output.overwrite=true to start over "
                "there, or choose another output.dir"
            )
        found = checkpoint.choose(root)
        saved_world, world = checkpoint.read_state(found).world_size, int(os.environ.get("WORLD_SIZE", "1"))
        if self.strategy.name.startswith("zero") and saved_world != world:
            # Each rank's optimizer share is its own partition: refused here, before anything loads.
            raise UserError(
                f"checkpoint {found} was written by {saved_world} DeepSpeed ranks and cannot be resumed on {world}: "
                f"relaunch with --num_processes {saved_world}, or set output.overwrite=true to start over"
            )
        return found

    def resume(self, path: Path, accelerator, model, optimizer, scheduler):
        """Restore a run's state from checkpoint ``path`` (after ``prepare``); returns the TrainState."""
        t = self.config.train
        saved_batch = checkpoint.read_state(path).global_batch
        global_batch = t.micro_batch_size * t.grad_accum * accelerator.num_processes
        if self.config.data.group_by_length and saved_batch and saved_batch != global_batch:
            # The length-grouped order is cut into global batches: another batch size is another order, and
            # resuming into it would repeat some examples and skip others.
            raise UserError(
                f"{path} was written with a global batch of {saved_batch} and data.group_by_length=true; this "
                f"launch has {global_batch}: keep micro_batch_size x grad_accum x processes equal to resume"
            )
        state = checkpoint.load(
            path, accelerator=accelerator, strategy=self.strategy, model=model, optimizer=optimizer, scheduler=scheduler
        )
        self.facts["resumed_from"] = str(path)
        return state

    def save_checkpoint(self, accelerator, model, optimizer, scheduler, state) -> Path:
        """A complete checkpoint of the run at this optimizer step (every rank calls this)."""
        unwrapped = accelerator.unwrap_model(model)
        root = checkpoint.checkpoints_dir(self.output_dir)
        with disk_errors(f"the checkpoint of step {state.step}", root):
            path = checkpoint.save(
                root,
                state,
                accelerator=accelerator,
                strategy=self.strategy,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                adapter_state=self._adapter_state(unwrapped, keep=accelerator.is_main_process),
                config_yaml=self.config.to_yaml(),
                keep=self.config.output.keep_checkpoints,
            )
        self.callbacks.fire(self._event("on_checkpoint_saved", accelerator, state.step, path=path))
        return path

    def step_end_callbacks(self, accelerator, step: int, metrics: dict[str, Any]) -> bool:
        """Fire ``on_step_end`` (and ``on_evaluate`` when ``metrics`` has an eval loss); True when the run should
        stop. The decision is all-reduced so every rank stops at the same step, whichever rank's callback asked."""
        if not self.callbacks:
            return False
        wants_stop = self.callbacks.fire(self._event("on_step_end", accelerator, step, metrics=metrics))
        if metrics.get("eval_loss") is not None:
            wants_stop |= self.callbacks.fire(self._event("on_evaluate", accelerator, step, metrics=metrics))
        (votes,) = all_reduce_sum([float(wants_stop)], accelerator.device)
        return votes > 0

    def _event(self, name: str, accelerator, step: int, **fields: Any) -> Event:
        return Event(name, step, accelerator.process_index, accelerator.num_processes, self.output_dir, **fields)

    def mark_preempted(self, accelerator, state, signal_name: str | None) -> None:
        """Leave the ``PREEMPTED`` marker a requeue script decides from (rank 0, after the checkpoint)."""
        if accelerator.is_main_process:
            checkpoint.write_marker(self.output_dir, checkpoint.PREEMPTED, {"step": state.step, "signal": signal_name})
            log.warning(
                "preempted by %s at step %d: checkpoint saved; run the same command to resume", signal_name, state.step
            )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shard_facts(indices_per_rank: list[list[int]], num_examples: int | None) -> dict[str, Any] | None:
    """What the ranks actually consumed in the first epoch: counts, overlap and coverage of the data set.
    None when the loop did not record which examples it used (a user's own loop)."""
    if not any(indices_per_rank):
        return None
    sets = [set(ix) for ix in indices_per_rank]
    union = set().union(*sets) if sets else set()
    return {
        "examples_per_rank": [len(ix) for ix in indices_per_rank],
        "disjoint": sum(len(s) for s in sets) == len(union)
        and all(len(s) == len(ix) for s, ix in zip(sets, indices_per_rank, strict=True)),
        "covered": len(union),
        "total": num_examples,
    }
