"""qlora_dist: multi-GPU QLoRA fine-tuning over accelerate, peft and bitsandbytes.

Heavy libraries (torch, transformers, peft, bitsandbytes) load only when a piece that needs them is used, so
``qlora-dist --help`` and config validation stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import RunConfig, load_config
from .errors import ConfigError, DataError, UserError

__version__ = "0.1.0"
__all__ = ["QLoRAPlugin", "RunConfig", "load_config", "train", "UserError", "ConfigError", "DataError"]

if TYPE_CHECKING:
    from .plugin import QLoRAPlugin
    from .train import train


def __getattr__(name: str):
    if name == "QLoRAPlugin":
        from .plugin import QLoRAPlugin

        return QLoRAPlugin
    if name == "train":
        from .train import train

        return train
    raise AttributeError(f"module 'qlora_dist' has no attribute {name!r}")
