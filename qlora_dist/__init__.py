"""qlora_dist: multi-GPU QLoRA fine-tuning over accelerate, peft and bitsandbytes.

Heavy libraries (torch, transformers, peft, bitsandbytes) load only when a piece that needs them is used, so
``qlora-dist --help`` and config validation stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import RunConfig, load_config
from .errors import ConfigError, DataError, UserError

__version__ = "0.1.0"
__all__ = ["QLoRAPlugin", "RunConfig", "load_config", "train", "loss_scale", "UserError", "ConfigError", "DataError"]

if TYPE_CHECKING:
    from .plugin import QLoRAPlugin
    from .train import loss_scale, train


def __getattr__(name: str):
    if name == "QLoRAPlugin":
        from .plugin import QLoRAPlugin

        return QLoRAPlugin
    if name in ("train", "loss_scale"):  # loss_scale: the step's loss normalisation, for your own loss
        import importlib

        # The module, not ``from . import train``: that would look up this very attribute again. Importing it
        # binds the submodule to ``qlora_dist.train``; the function takes that name back.
        module = importlib.import_module(".train", __name__)
        globals().update(train=module.train, loss_scale=module.loss_scale)
        return globals()[name]
    raise AttributeError(f"module 'qlora_dist' has no attribute {name!r}")
