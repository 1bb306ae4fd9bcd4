"""Linear layers that are not a plain ``nn.Linear``, and what loading and merging must do about them.

transformers' bitsandbytes quantizer replaces a module by a 4-bit ``Linear4bit`` only when its type *is*
``nn.Linear`` or it is a ``Conv1D`` (``replace_with_bnb_linear``). Two kinds of layer fall outside or need care:

- **Subclasses of nn.Linear with the same arithmetic** (Falcon's ``FalconLinear``: ``x @ W.T + b``, only
  written without ``F.linear``). The quantizer skips them, so the base would stay in full precision. While a
  model of such a family is built, :func:`plain_linear_layers` makes its modeling module construct plain
  ``nn.Linear`` instead: same parameters, same names, same result, and then the quantizer replaces them.
- **Conv1D** (GPT-2 and its relatives) stores its weight as (in, out). The quantizer transposes it to the
  (out, in) layout of ``Linear4bit`` before quantizing, so the 4-bit weight, its dequantized copy and the
  LoRA delta are all (out, in), while the checkpoint and a plain transformers model hold (in, out). A merge
  must write those weights back transposed: :func:`conv1d_weights` names them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from torch import nn

LINEAR_EQUIVALENTS: dict[str, tuple[str, str]] = {
    "falcon": ("transformers.models.falcon.modeling_falcon", "FalconLinear"),
}
"""``model_type: (modeling module, class)`` for nn.Linear subclasses whose forward is exactly nn.Linear's."""


@contextlib.contextmanager
def plain_linear_layers(model_type: str | None) -> Iterator[None]:
    """While the block runs, models of ``model_type`` build their linear layers as plain ``nn.Linear``.

    The modeling code looks the class up in its module's globals when it builds a layer, so swapping that
    global for the duration of ``from_pretrained`` / ``from_config`` is enough; it is put back afterwards
    (also on error). A no-op for families not in :data:`LINEAR_EQUIVALENTS`.
    """
    entry = LINEAR_EQUIVALENTS.get(model_type or "")
    if entry is None:
        yield
        return
    module = importlib.import_module(entry[0])
    saved = getattr(module, entry[1])
    setattr(module, entry[1], nn.Linear)
    try:
        yield
    finally:
        setattr(module, entry[1], saved)


def conv1d_weights(model: nn.Module) -> set[str]:
    """Names (as in ``model``) of the weights stored (in, out), Conv1D-style: plain ``Conv1D`` modules, and
    4-bit layers that replaced one (transformers records the replaced class as ``source_cls``)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, module in model.named_modules():
        source = getattr(module, "source_cls", None)
        if isinstance(module, Conv1D) or (isinstance(source, type) and issubclass(source, Conv1D)):
            names.add(f"{name}.weight" if name else "weight")
    return names
