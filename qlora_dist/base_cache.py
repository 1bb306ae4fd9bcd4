"""Quantize once per machine: the packed NF4 base, written once and loaded by every rank and every later run.

Without it every rank reads the whole 16-bit checkpoint and quantizes it, at every start: eight ranks of a 70B
model read 8 x 140 GB, and a requeue after a preemption pays it all again. With it the local main process of
each machine quantizes once (the ordinary load path) and saves the result with transformers' own
``save_pretrained`` of a 4-bit model: packed 4-bit weights and their quantization state (absmax, quant map,
nested statistics) as safetensors, the unquantized tensors in the compute dtype, the ``quantization_config``
in config.json. The other ranks then load that folder, which transformers recognises as pre-quantized and
restores without quantizing: the same bytes, so the same base checksum and the same training
(``tests/unit/test_base_cache.py``).

Mixture-of-experts bases: their experts are held in NF4 by qlora_dist itself (``quant/moe.py``), which a
pre-quantized transformers load does not restore. They are set aside while ``save_pretrained`` writes the rest
and written next to it, one ``nf4_experts.<module>.safetensors`` per experts module (packed matrices and
bitsandbytes' serialised quantization states); loading the folder builds those modules empty
(``moe.slots_for_cached``) and fills them from the files, without quantizing (``moe.restore_cached``).

The folder's name is a hash of the base files' identity (path, size and modification time of config.json and
every weight file) and of everything that changes the quantized bytes: quant type, double quantization,
storage dtype, compute dtype, device type, the transformers/bitsandbytes/torch versions and :data:`FORMAT`. A
changed base or setting is a new key, hence a fresh build; old folders are left for the user to delete. A folder
is written under a temporary name and renamed into place once complete, so a crashed build is never loaded.

Under ZeRO-3 too: transformers 5.24 never builds a quantized model under DeepSpeed's ``zero.Init``
(``PreTrainedModel.get_init_context`` adds it only ``if not is_quantized``; a quantized model is built on the
meta device, pre-quantized or not), and bitsandbytes' quantizer turns ``device_map`` None into this process's
device. So every rank holds its whole 4-bit base after the load either way, and DeepSpeed partitions it in
``deepspeed.initialize``; quantizing on load and loading the cache fill the same unpartitioned modules
(``tests/distributed/test_moe.py``'s ZeRO-3 run: rank 1 loads the cache, checksum equal to rank 0's and to a
fresh quantization). Should a later version partition the base while it loads, the cache is not written
(:func:`_refusal`) and loading one fails loudly instead of filling partitioned modules.

Not used for a hub id that is not a local folder or with ``quant.cache`` off; the load is then the ordinary one,
and ``BaseLoad.reason`` (the run report's ``base_load_per_rank``) says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fsutil import fsync_dir, fsync_file

log = logging.getLogger(__name__)

FORMAT = 2
"""In the key: what qlora_dist itself writes into a cache folder (2: NF4 experts in files of their own)."""
COMPLETE = "qlora_dist_cache.json"
"""Written last into a cache folder: its key and what it was built from."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


@dataclasses.dataclass
class BaseLoad:
    """How this rank got its 4-bit base (``run_report.json``'s ``base_load_per_rank``)."""

    source: str
    """``cache`` (loaded the packed NF4 folder), ``built`` (quantized the checkpoint and wrote the cache) or
    ``checkpoint`` (quantized the checkpoint, no cache)."""
    seconds: float
    """Wall time of the load, quantization and (``built``) the write."""
    file_bytes: int
    """Bytes of the weight files this rank loaded (the checkpoint's, or the cache's)."""
    disk_read_bytes: int | None
    """Bytes this process read from storage during the load (``/proc/self/io``: page-cache hits are not
    counted); None where the kernel does not say."""
    cache_dir: str | None = None
    reason: str | None = None
    """Why the cache was not used (``source`` ``checkpoint``); None when it was."""


def cache_key(model_dir: Path, quant, compute_dtype: torch.dtype, device: torch.device) -> str:
    """A hash of the base files' identity and of every setting that changes the quantized bytes."""
    import bitsandbytes
    import transformers

    files = []
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.startswith("tokenizer"):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    settings = {
        "quant_type": quant.quant_type,
        "double_quant": quant.double_quant,
        "storage_dtype": quant.storage_dtype,
        "compute_dtype": str(compute_dtype),
        "device": device.type,
        "versions": [transformers.__version__, bitsandbytes.__version__, torch.__version__],
        "format": FORMAT,
    }
    raw = json.dumps({"base": str(model_dir.resolve()), "files": files, "settings": settings}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def load_base(
    load: Callable[[str], nn.Module],
    name_or_path: str,
    model_dir: Path | None,
    quant,
    compute_dtype: torch.dtype,
    device: torch.device,
    cache_root: Path | None,
    is_local_main: bool,
    wait_for_everyone: Callable[[], None],
    reason: str | None = None,
) -> tuple[nn.Module, BaseLoad]:
    """The 4-bit base through the cache: ``load(path)`` is the ordinary loader (quantizes a 16-bit checkpoint,
    or restores a pre-quantized folder). ``cache_root`` None (``reason`` says why) or no local ``model_dir``
    (a hub id) loads ``name_or_path`` without a cache.

    Every process must call this (there is one barrier when the cache is used): the local main process builds
    the cache when it is missing, the others wait for it and load it.
    """
    start, io_start = time.perf_counter(), _disk_read_bytes()
    from .quant import moe

    if cache_root is None or model_dir is None:
        model = load(name_or_path)
        why = reason or ("model.name_or_path is not a local folder" if model_dir is None else "no cache folder")
        return model, _done("checkpoint", start, io_start, _weight_bytes(model_dir), None, why)

    folder = Path(cache_root) / cache_key(model_dir, quant, compute_dtype, device)
    source, why = "cache", None
    model = None
    if is_local_main and not _complete(folder):
        model = load(str(model_dir))
        why = _refusal(model)
        if why is not None:
            log.warning("quantized-base cache not written (%s): every rank quantizes", why)
            source = "checkpoint"
        else:
            try:
                from .model import base_checksum

                # Recorded with the folder: every later load is checked against it (:func:`verify`).
                _write(model, folder, model_dir, base_checksum(model))
                source = "built"
            except OSError as e:  # a full or read-only cache folder slows the start, it must not stop the run
                log.warning("could not write the quantized-base cache %s (%s): every rank quantizes", folder, e)
                source, why = "checkpoint", f"could not write {folder}: {e}"
    wait_for_everyone()
    if model is None and not _complete(folder):
        model, source = load(name_or_path), "checkpoint"
        why = f"the local main process wrote no cache at {folder} (its log says why)"
    if model is None:
        with warnings.catch_warnings(), moe.slots_for_cached(folder):
            # The folder's own quantization_config is the one asked for (the key).
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
            model = load(str(folder))
        if _partitioned(model):
            raise RuntimeError(
                f"the quantized base in {folder} was loaded partitioned (DeepSpeed zero.Init): the cache cannot be "
                "restored into partitioned modules; set quant.cache: false"
            )
        moe.restore_cached(model, folder, device, compute_dtype)
        # The model stands for the base checkpoint, not the cache: a saved adapter records this as its base.
        model.name_or_path = model.config._name_or_path = name_or_path
    files = _weight_bytes(folder) if source == "cache" else _weight_bytes(model_dir)
    return model, _done(source, start, io_start, files, str(folder) if source != "checkpoint" else None, why)


def verify(load: BaseLoad, checksum: str) -> None:
    """A base loaded from the cache (``load``) must have the checksum recorded when the cache was written: the
    bits quantizing the checkpoint gave. ``checksum`` is :func:`qlora_dist.model.base_checksum` of the loaded
    base (the run computes it anyway). Raises a UserError naming the folder on a mismatch."""
    if load.source != "cache" or load.cache_dir is None:
        return
    from .errors import UserError

    recorded = json.loads((Path(load.cache_dir) / COMPLETE).read_text()).get("checksum")
    if recorded is None:
        log.warning("the quantized-base cache %s records no checksum (written by an older version): not verified",
                    load.cache_dir)  # fmt: skip
    elif recorded != checksum:
        raise UserError(
            f"the quantized base cached in {load.cache_dir} does not match what was written there (checksum "
            f"{checksum[:12]} against {recorded[:12]}): it is damaged; move or delete that folder and start again "
            "(it is rebuilt), or set quant.cache: false"
        )


def _write(model: nn.Module, folder: Path, model_dir: Path, checksum: str) -> None:
    """Save the quantized ``model`` into ``folder`` atomically (a temporary folder, then a rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from .quant import moe

    try:
        with moe.set_aside(model) as experts:  # NF4 experts: files of their own (the module docstring)
            model.save_pretrained(tmp, safe_serialization=True)
        moe.save_cached(experts, tmp)
        info = {"key": folder.name, "base": str(model_dir.resolve()), "written": time.time(), "checksum": checksum}
        (tmp / COMPLETE).write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if folder.exists():  # another process (a second node on a shared file system) got there first
            shutil.rmtree(tmp)
            return
        tmp.rename(folder)
        fsync_dir(folder.parent)
        log.info("wrote the quantized base to %s (%.2f GB)", folder, _weight_bytes(folder) / 1e9)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refusal(model: nn.Module) -> str | None:
    """Why this freshly quantized ``model`` cannot be cached (None: it can)."""
    from .quant import moe

    if _partitioned(model):  # save_pretrained would write the empty placeholders of other ranks' shards
        return "the base was partitioned while it loaded (DeepSpeed zero.Init)"
    return moe.cache_refusal(model)


def _partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def _weight_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def _disk_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _done(
    source: str, start: float, io_start: int | None, files: int, folder: str | None, reason: str | None
) -> BaseLoad:
    io_end = _disk_read_bytes()
    disk = io_end - io_start if io_start is not None and io_end is not None else None
    return BaseLoad(source, round(time.perf_counter() - start, 3), files, disk, folder, reason)


def report(load: BaseLoad) -> dict[str, Any]:
    return dataclasses.asdict(load)
