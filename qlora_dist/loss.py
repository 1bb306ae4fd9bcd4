"""The next-token loss, computed from the final hidden states in chunks so the full-vocabulary logits never exist.

A causal LM's own forward projects every position onto the vocabulary: batch x length x vocabulary logits
(8 x 512 x 65,536 in float32 is 1 GiB), then their float32 copy, the softmax inside cross-entropy and the
gradient of each. Here the model runs with ``logits_to_keep=1`` (its head projects only the last position),
the decoder's final hidden states are caught on the way out, and the loss is taken over the labelled tokens
only, ``chunk`` tokens at a time: hidden rows -> logits chunk -> cross-entropy -> gradient of those rows ->
discard. The memory for the loss is O(chunk x vocabulary), not O(tokens x vocabulary).

Each chunk's gradient is computed in the forward pass (as Liger's fused linear cross-entropy does), written
out as ``softmax - onehot`` in the chunk's own logits buffer: the loss is a sum, so its gradient is the chunk's
gradient times the scalar that arrives in backward. That costs the same head FLOPs as the full-logit path (a recompute in backward would add
a third head matmul) and keeps only a hidden-sized gradient between forward and backward.

What the model's head does after its matmul is mirrored exactly (tied embeddings are just the same weight; a
Gemma 2/3 final-logit soft-cap; Cohere's ``logit_scale``; Granite's ``logits_scaling``), and checked on every
call: the one row of logits the model does compute (the last position) must equal ours, or the call raises
rather than train on a different loss. Under ZeRO-3 the head weight is gathered for the loss (the model's
forward has already let go of it). Under FSDP2 the loss is tied to the model's own (one-row) output, so that
``fully_shard``'s backward hooks on the root's outputs run. A head that is itself trained (its weight requires
grad) or a model whose forward takes no ``logits_to_keep`` falls back to the full logits; which path a model
took is :func:`loss_path` (the run report's ``loss``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IGNORE = -100
CHUNK_LOGIT_BYTES = 64 * 2**20
"""Automatic chunk size: as many tokens as keep one chunk's float32 logits near this size. Measured on a CPU
(vocabulary 65,536, 1,024 rows): chunks of 128 rows cost 5-15% more CPU time than the full logits, 256 rows
and more cost less than the full logits (one pass fewer over chunk x vocabulary buffers)."""
_INPUTS = ("input_ids", "attention_mask", "position_ids")


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None = 0) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled tokens of ``batch`` (labels -100 are ignored).

    ``chunk_tokens``: tokens per loss chunk (0 picks it from the vocabulary size, see :data:`CHUNK_LOGIT_BYTES`);
    None computes the model's full logits (the reference path). ``model`` may be wrapped (DDP, a DeepSpeed
    engine, peft): it is always called through its own forward, so gradient synchronisation works as usual.
    """
    inputs = {k: v for k, v in batch.items() if k in _INPUTS}
    # Shift the labels left rather than cutting the last position off the logits (no copy of the logits); the
    # extra -100 costs nothing.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    head = HeadSpec.of(model) if chunk_tokens is not None else None
    if chunk_tokens is None:
        _record(model, "full logits: train.chunked_loss is false")
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        labels = labels.to(logits.device)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")

    caught: list[torch.Tensor] = []
    hook = head.decoder.register_forward_hook(lambda _m, _i, out: caught.append(_last_hidden(out)))
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = caught[-1]  # [batch, length, hidden]: what the head would have projected
    labels = labels.to(hidden.device).flatten()
    rows = (labels != IGNORE).nonzero().squeeze(1)
    chunk = chunk_tokens or auto_chunk_tokens(head.vocab_size)
    with head.gathered():
        head.check(hidden[:, -1:], out.logits.detach())
        # Only labelled rows are projected: prompt and padding tokens cost no vocabulary matmul at all.
        selected = hidden.flatten(0, 1).index_select(0, rows)
        loss = _ChunkedLoss.apply(selected, labels.index_select(0, rows), head, chunk)
    _record(model, CHUNKED)
    if head.fsdp2:
        # FSDP2 runs its root's backward bookkeeping from hooks on the root's outputs; a loss that uses none of
        # them (ours reads the decoder's hidden states) leaves the root mid-forward, and the backward then
        # crashed (SIGSEGV, torch 2.13, CPU/gloo). A zero gradient into the one-row logits runs those hooks.
        loss = _TiedTo.apply(loss, out.logits)
    return loss


CHUNKED = "chunked"


def loss_path(model: nn.Module) -> str | None:
    """How :func:`token_loss_sum` took ``model``'s loss: ``"chunked"``, ``"full logits: <why>"``, or None
    before its first call (what the run report's ``loss`` says)."""
    return getattr(model, "_qlora_dist_loss_path", None)


def _record(model: nn.Module, path: str) -> None:
    if loss_path(model) != path:
        with contextlib.suppress(AttributeError):
            model._qlora_dist_loss_path = path


class _TiedTo(torch.autograd.Function):
    """``loss`` unchanged, with a zero gradient flowing into ``other`` in backward."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        ctx.other = (other.shape, other.dtype, other.device)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.other
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def auto_chunk_tokens(vocab_size: int) -> int:
    """Tokens per loss chunk when ``train.loss_chunk_tokens`` is 0: :data:`CHUNK_LOGIT_BYTES` of float32 logits."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * max(vocab_size, 1)))


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss (labels shifted by one, -100 ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch (what tokens/s counts)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["real_tokens"].sum()) if "real_tokens" in batch else int(batch["input_ids"].numel())


@dataclasses.dataclass
class HeadSpec:
    """The output head as the model applies it: ``post(hidden @ weight.T + bias)``."""

    decoder: nn.Module
    head: nn.Module
    vocab_size: int
    scale: tuple[str, float] | None = None
    """``("mul", s)`` (Cohere's ``logit_scale``) or ``("div", s)`` (Granite's ``logits_scaling``)."""
    softcap: float | None = None
    """Gemma 2/3: ``cap * tanh(logits / cap)``."""
    fsdp2: bool = False
    """The model is under FSDP2's ``fully_shard`` (the loss is then tied to its output, see token_loss_sum)."""
    _whole: tuple | None = dataclasses.field(default=None, repr=False)
    """(weight, bias) made whole from FSDP2 shards, inside :meth:`gathered`."""

    @classmethod
    def of(cls, model: nn.Module) -> HeadSpec | None:
        """The head of ``model`` (through DDP/DeepSpeed/peft wrappers), or None where the chunked loss does not
        apply (no plain linear head, a trained head, no ``logits_to_keep``): the caller then uses full logits."""
        lm = _causal_lm(model)
        head = lm.get_output_embeddings() if lm is not None else None
        if lm is None or not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
            return _fallback(model, "no plain linear output head")
        if any(p.requires_grad for p in head.parameters()):
            return _fallback(model, "the output head is trained")
        if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
            return _fallback(model, f"{type(lm).__name__}.forward takes no logits_to_keep")
        config = lm.config
        scale = None
        kind = str(getattr(config, "model_type", ""))
        if kind.startswith("cohere") and getattr(config, "logit_scale", None) not in (None, 1.0):
            scale = ("mul", float(config.logit_scale))
        elif kind.startswith("granite") and getattr(config, "logits_scaling", None) not in (None, 1.0):
            scale = ("div", float(config.logits_scaling))
        softcap = getattr(config, "final_logit_softcapping", None)
        vocab = int(head.out_features)  # not weight.shape: ZeRO-3 leaves a 0-sized placeholder there
        return cls(lm.get_decoder(), head, vocab, scale, float(softcap) if softcap else None, _fsdp2_managed(model))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``hidden`` rows, in its own dtype and order of operations."""
        # F.linear, not the module: under ZeRO-3 calling the module outside the engine's forward would run its
        # gather hooks out of the order DeepSpeed traced (the weight is gathered by `gathered` instead).
        weight, bias = self._whole if self._whole is not None else (self.head.weight, self.head.bias)
        logits = F.linear(hidden, weight, bias)
        if self.scale is not None:
            logits = logits * self.scale[1] if self.scale[0] == "mul" else logits / self.scale[1]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden).float(), labels, ignore_index=IGNORE, reduction="sum")

    @torch.no_grad()
    def loss_and_grad(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy of ``hidden`` rows (every label real) and its gradient with respect to them.

        Written out rather than left to autograd: the gradient of cross-entropy over logits is
        ``softmax - onehot``, so it is made in place in the float32 logits buffer itself, where autograd would
        keep the log-softmax output and build two more chunk x vocabulary tensors in backward (a third of the
        loss time on a CPU). The chain through the head's post-processing is applied by hand: the soft-cap's
        derivative ``1 - (y / cap)^2`` (y the capped logit), then the scale; then one matmul back to the rows.
        """
        y = self.logits(hidden).float()  # the model's logits, upcast as its loss would (a copy unless float32)
        rows = torch.arange(y.shape[0], device=y.device)
        target = y[rows, labels]
        slope = None
        if self.softcap is not None:
            slope = (y / self.softcap).square_().neg_().add_(1)  # d capped / d uncapped, before y is overwritten
        top = y.amax(dim=1, keepdim=True)
        y.sub_(top).exp_()  # y is now exp(logit - max): the unnormalised softmax
        total = y.sum(dim=1, keepdim=True)
        loss = (total.log().squeeze(1) + top.squeeze(1) - target).sum()
        y.div_(total)
        y[rows, labels] -= 1  # softmax - onehot: d loss / d logits
        if slope is not None:
            y.mul_(slope)
        if self.scale is not None:
            y.mul_(self.scale[1]) if self.scale[0] == "mul" else y.div_(self.scale[1])
        weight = self._whole[0] if self._whole is not None else self.head.weight
        return loss, y.to(weight.dtype) @ weight

    @contextlib.contextmanager
    def gathered(self):
        """The head's weight made whole for the loss: gathered under ZeRO-3 (partitioned again afterwards), or
        all-gathered from an FSDP2 DTensor shard (dropped afterwards). Every rank must call this."""
        params = [p for p in self.head.parameters() if hasattr(p, "ds_id")]
        if params:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
            return
        weight, bias = self.head.weight, self.head.bias
        if hasattr(weight, "full_tensor") or hasattr(bias, "full_tensor"):
            self._whole = tuple(t.full_tensor() if hasattr(t, "full_tensor") else t for t in (weight, bias))
            try:
                yield
            finally:
                self._whole = None
            return
        yield

    @torch.no_grad()
    def check(self, hidden: torch.Tensor, model_logits: torch.Tensor) -> None:
        """Our logits for the last position must be the model's own, else the loss would be another one."""
        ours = self.logits(hidden).float()
        theirs = model_logits.float()
        if ours.shape != theirs.shape:
            raise RuntimeError(f"chunked loss: model returned logits of shape {tuple(theirs.shape)}, not {ours.shape}")
        # Same rows, same kernel: equal up to the last bits of the accumulation order (a wrong scale or soft-cap
        # is off by far more than that).
        tol = (1e-4 if model_logits.dtype == torch.float32 else 1e-2) * max(float(theirs.abs().max()), 1.0)
        error = float((ours - theirs).abs().max())
        if not error <= tol:
            raise RuntimeError(
                f"chunked loss: the head applied outside the model gives different logits than the model "
                f"(max |difference| {error:.3g}, allowed {tol:.3g}; {type(self.head).__name__}, "
                f"scale {self.scale}, softcap {self.softcap}). Set train.chunked_loss=false for this model."
            )


class _ChunkedLoss(torch.autograd.Function):
    """Sum of cross-entropy over ``hidden`` rows, ``chunk`` rows at a time; the gradient is made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, labels: torch.Tensor, head: HeadSpec, chunk: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows, targets = hidden[start : start + chunk], labels[start : start + chunk]
            if grad is None:
                total += head.loss(rows, targets)
                continue
            loss, grad[start : start + chunk] = head.loss_and_grad(rows, targets)
            total += loss
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _causal_lm(model: nn.Module) -> nn.Module | None:
    """The transformers causal LM inside DDP / DeepSpeed / peft wrappers."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    return None


def _fsdp2_managed(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())  # fully_shard wraps the peft model


def _fallback(model: nn.Module, why: str) -> None:
    if loss_path(model) is None:
        log.info("full-vocabulary logits for the loss: %s", why)
    _record(model, f"full logits: {why}")
    return None
