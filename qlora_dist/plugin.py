"""The library face of qlora_dist: config in, ready pieces out, for your own accelerate script.

::

    plugin = QLoRAPlugin.from_yaml("run.yaml")
    accelerator = plugin.make_accelerator()
    model, tokenizer = plugin.load_model(accelerator)
    train_data, eval_data = plugin.load_data(accelerator, tokenizer)
    model, optimizer = plugin.prepare(accelerator, model, plugin.make_optimizer(model))
    ...  # your own loop; plugin.batches(...) yields this rank's shard
    plugin.finish(accelerator, model, tokenizer)

``qlora-dist train`` is built from exactly these pieces (see ``train.py``), so the library and the ready
entry point cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from . import model as model_mod
from .config import RunConfig, from_dict, load_config
from .distributed import GradSyncCounter, gather_objects, make_accelerator, on_cpu, peak_memory_bytes
from .errors import UserError
from .merge import QUANT_META, merge_trained
from .report import write_json

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where tokenized data sets are cached: ``$QLORA_DIST_CACHE`` or ``~/.cache/qlora_dist``."""
    return Path(os.environ.get("QLORA_DIST_CACHE", Path.home() / ".cache" / "qlora_dist"))


class QLoRAPlugin:
    """Builds every QLoRA piece of a distributed run from one :class:`RunConfig`, and keeps the measured facts
    (checksums, synced bytes, timings) that end up in ``run_report.json``."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config.validate()
        self.output_dir = Path(config.output.dir)
        self.grad_sync = GradSyncCounter()
        self.facts: dict[str, Any] = {}
        self._start = time.perf_counter()

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
        """An Accelerator with the right backend (NCCL, or gloo on a CPU-only machine), checked world size."""
        model_mod.check_model_path(self.config.model)
        if not self.config.output.overwrite and (self.output_dir / "run_report.json").exists():
            raise UserError(
                f"output.dir={self.output_dir} already holds a finished run; "
                "choose another output.dir or set output.overwrite=true"
            )
        accelerator = make_accelerator(**kwargs)
        self.compute_dtype = model_mod.resolve_dtype(self.config.quant.compute_dtype, accelerator.device)
        if on_cpu() and accelerator.is_main_process and self.config.train.optimizer.startswith("paged"):
            log.info(
                "paged optimizers need CUDA: on this CPU bitsandbytes runs %s unpaged", self.config.train.optimizer
            )
        return accelerator

    def load_tokenizer(self):
        """The run's tokenizer, with a pad token."""
        return model_mod.load_tokenizer(self.config.model)

    def load_model(self, accelerator, tokenizer=None) -> tuple[torch.nn.Module, Any]:
        """The NF4 base on this process's device, frozen, checkpointed, with LoRA attached; and its tokenizer."""
        cfg = self.config
        tokenizer = tokenizer if tokenizer is not None else self.load_tokenizer()
        base = model_mod.load_quantized_model(cfg.model, cfg.quant, accelerator.device, self.compute_dtype)
        self.facts["base_checksum_before"] = model_mod.base_checksum(base)
        if cfg.train.gradient_checkpointing:
            model_mod.enable_gradient_checkpointing(base)
        # Seed right before LoRA init so every rank starts from the same adapter weights.
        torch.manual_seed(cfg.train.seed)
        model = model_mod.attach_lora(base, cfg.lora)
        trainable, total = model_mod.count_params(model)
        self.facts.update(
            trainable_params=trainable,
            total_params=total,
            trainable_grad_bytes=model_mod.trainable_grad_bytes(model),
            full_grad_bytes=total * torch.finfo(torch.float32).bits // 8,
        )
        return model, tokenizer

    def load_data(self, accelerator, tokenizer):
        """Tokenized (train, eval) data sets; the local main process tokenizes first, the others read its cache."""
        return data_mod.prepare_datasets(
            self.config.data,
            tokenizer,
            seed=self.config.train.seed,
            cache_dir=default_cache_dir() / "tokenized",
            is_main_process=accelerator.is_local_main_process,
            wait_for_everyone=accelerator.wait_for_everyone,
        )

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The configured optimizer over the trainable (adapter) parameters only."""
        params = [p for p in model.parameters() if p.requires_grad]
        t = self.config.train
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        import bitsandbytes as bnb

        cls = {
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
            "adamw_8bit": bnb.optim.AdamW8bit,
        }[t.optimizer]
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)

    def prepare(self, accelerator, model, optimizer):
        """``accelerator.prepare`` the model and optimizer, then count the bytes DDP all-reduces."""
        model, optimizer = accelerator.prepare(model, optimizer)
        self.grad_sync.attach(model)
        return model, optimizer

    def steps_per_epoch(self, num_examples: int, world_size: int) -> int:
        """Optimizer steps in one epoch of ``num_examples`` sharded over ``world_size`` ranks."""
        t = self.config.train
        per_rank = num_examples // world_size
        if per_rank == 0:
            raise UserError(
                f"data.path={self.config.data.path}: {num_examples} training examples for {world_size} processes"
            )
        return math.ceil(math.ceil(per_rank / t.micro_batch_size) / t.grad_accum)

    def epoch_steps(self, dataset, epoch: int, rank: int, world_size: int, pad_id: int) -> Iterator[list[dict]]:
        """This rank's batches for ``epoch``, grouped per optimizer step (``grad_accum`` micro-batches each)."""
        t = self.config.train
        indices = data_mod.rank_indices(len(dataset), t.seed, epoch, rank, world_size)
        micro = [indices[i : i + t.micro_batch_size] for i in range(0, len(indices), t.micro_batch_size)]
        for s in range(0, len(micro), t.grad_accum):
            yield [self._batch(dataset, idx, pad_id) for idx in micro[s : s + t.grad_accum]]

    @staticmethod
    def _batch(dataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        batch = data_mod.collate([dataset[i] for i in indices], pad_id)
        batch["index"] = torch.tensor(indices)  # which examples these are: the run reports its data shards
        return batch

    # -- the end ------------------------------------------------------------------------------------------

    def finish(self, accelerator, model, tokenizer, stats: dict[str, Any] | None = None, check_batches=None):
        """Save the adapter, gather per-rank facts, merge on rank 0, write ``run_report.json``.

        Non-main processes return right after the gathers, so they never wait on a collective while rank 0
        merges. Returns the report on the main process and None elsewhere.
        """
        cfg = self.config
        unwrapped = accelerator.unwrap_model(model)
        per_rank = gather_objects(
            {
                "base_checksum_after": model_mod.base_checksum(unwrapped),
                "lora_checksum": model_mod.lora_checksum(unwrapped),
                "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                "examples": (stats or {}).get("examples_first_epoch"),
                "indices": (stats or {}).get("indices_first_epoch", []),
            }
        )
        if not accelerator.is_main_process:
            return None
        adapter_dir = self.output_dir / "adapter"
        unwrapped.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        # Record the 4-bit settings the adapter was trained against, so a later `qlora-dist merge` can rebuild
        # the same dequantized base.
        write_json(
            adapter_dir / QUANT_META,
            {"quant": dataclasses.asdict(cfg.quant), "compute_dtype": str(self.compute_dtype).replace("torch.", "")},
        )
        report: dict[str, Any] = {
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "device": accelerator.device.type,
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
            **{
                k: self.facts[k]
                for k in ("trainable_params", "total_params", "trainable_grad_bytes", "full_grad_bytes")
            },
            "grad_sync_bytes_per_step": None,
            "base_checksum_before": self.facts["base_checksum_before"],
            "base_checksum_after": [r["base_checksum_after"] for r in per_rank],
            "lora_checksum_per_rank": [r["lora_checksum"] for r in per_rank],
            "examples_per_rank": [r["examples"] for r in per_rank],
            "data_shards": shard_facts([r["indices"] for r in per_rank], (stats or {}).get("num_examples")),
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in per_rank],
        }
        steps = (stats or {}).get("steps")
        if steps:
            report["grad_sync_bytes_per_step"] = self.grad_sync.bytes_total // steps if self.grad_sync.attached else 0
        report.update(
            {k: v for k, v in (stats or {}).items() if k not in ("examples_first_epoch", "indices_first_epoch")}
        )
        report["merge"] = None
        if cfg.output.merge:
            merge_dtype = model_mod.resolve_dtype(cfg.output.merge_dtype, accelerator.device)
            if cfg.output.merge_dtype == "auto":
                merge_dtype = self.compute_dtype
            report["merge"] = merge_trained(
                unwrapped,
                adapter_dir,
                cfg.model.name_or_path,
                self.output_dir / "merged",
                cfg.output.merge_base,
                merge_dtype,
                tokenizer,
                check_batches or [],
                cfg.model.trust_remote_code,
                rank=accelerator.process_index,
            )
        report["wall_time_s"] = round(time.perf_counter() - self._start, 3)
        write_json(self.output_dir / "run_report.json", report)
        return report

    def write_resolved_config(self, accelerator) -> None:
        """Rank 0 writes the resolved config (every default filled in) into the output folder."""
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(self.config.to_yaml())


def shard_facts(indices_per_rank: list[list[int]], num_examples: int | None) -> dict[str, Any]:
    """What the ranks actually consumed in the first epoch: counts, overlap and coverage of the data set."""
    sets = [set(ix) for ix in indices_per_rank]
    union = set().union(*sets) if sets else set()
    return {
        "examples_per_rank": [len(ix) for ix in indices_per_rank],
        "disjoint": sum(len(s) for s in sets) == len(union)
        and all(len(s) == len(ix) for s, ix in zip(sets, indices_per_rank, strict=True)),
        "covered": len(union),
        "total": num_examples,
    }
