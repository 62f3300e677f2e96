"""LM-head matmul + cross-entropy over chunks of tokens, never materialising ``[N, V]`` logits.

For each chunk of ``chunk_size`` tokens: logits ``h_c @ W.T`` (fp32 accumulation, stored in the
operands' dtype, as megatron-core's and HF's bf16 output layers do), log-sum-exp and ``softmax -
onehot`` in Triton (fp32 math, the gradient written over the logits), then the gradient matmuls.
Peak extra memory is one chunk of logits plus an fp32 ``[V, H]`` accumulator for the weight
gradient. The logits passes are bandwidth-bound, so bf16 logits halve them; the weight gradient is
accumulated once per chunk (a read and write of the fp32 accumulator), so chunks are large
(:func:`default_chunk_size`).

- ``mean``/``sum``: the gradients are computed during the forward (the loss is a scalar, so the
  upstream gradient only rescales them) and stored until backward.
- ``none``: the upstream gradient is per token. The forward speculates that it will be the same
  for every non-ignored token (a masked mean or sum, as in training) and computes the gradients for
  a gradient of 1: backward then rescales them (the hidden gradient row by row, which is exact for
  any upstream gradient; the weight gradient by the common value). When the upstream gradient is
  not uniform over those tokens, backward recomputes each chunk's logits with the true per-token
  scale instead, and the process stops speculating (:data:`SPECULATE`), so a caller with weighted
  losses pays the extra work once.

The loss is fp32 (exact for fp32 operands; for bf16 ones, computed in fp32 from bf16-rounded
logits); gradients come back in the inputs' dtypes.
Like ``F.cross_entropy``, ``mean`` divides by the number of non-ignored tokens (NaN if none).
Labels must lie in ``[0, V)`` or equal ``ignore_index`` (not checked on the fused path).

``weight_grad_into`` (an fp32 tensor of the weight's shape): backward adds the weight gradient
into it instead of returning one (the weight gets ``None``). It is for megatron-core DDP's fp32
``main_grad``, as megatron's ``gradient_accumulation_fusion`` does for linear layers: the fp32
accumulator goes straight into the buffer (one pass) instead of a bf16 gradient that DDP's hook
adds again. The recomputing paths accumulate into it directly.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import _matmul
from ._dispatch import use_triton

_REDUCTIONS = ("none", "mean", "sum")

#: whether ``reduction="none"`` precomputes gradients in forward (turned off after a miss)
SPECULATE = {"on": True}


class _AddGradInto(torch.autograd.Function):
    """Identity on ``weight``; backward adds its gradient into ``into`` and gives ``weight`` none."""

    @staticmethod
    def forward(ctx, weight, into):
        ctx.set_materialize_grads(False)
        ctx.into = into
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            ctx.into.add_(grad)
        return None, None


def _check_grad_into(weight: torch.Tensor, into: torch.Tensor | None) -> None:
    if into is not None and (into.dtype != torch.float32 or into.shape != weight.shape
                             or into.device != weight.device):
        raise ValueError(f"weight_grad_into must be an fp32 tensor of the weight's shape {tuple(weight.shape)} "
                         f"on {weight.device}, got {into.dtype} {tuple(into.shape)} on {into.device}")


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    weight_grad_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels)`` in fp32 (``chunk_size`` is ignored); with
    ``weight_grad_into`` the fp32 weight gradient is added there instead of returned."""
    del chunk_size
    _check_grad_into(weight, weight_grad_into)
    weight32 = weight.to(torch.float32)
    if weight_grad_into is not None:
        weight32 = _AddGradInto.apply(weight32, weight_grad_into)
    logits = hidden.reshape(-1, hidden.shape[-1]).to(torch.float32) @ weight32.t()
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def default_chunk_size(n: int, h: int, v: int, itemsize: int = 2) -> int:
    """Tokens per chunk: one chunk's logits (``itemsize`` bytes each) twice the size of the fp32
    ``[V, H]`` weight-gradient accumulator, 256..8192 rows (at most ``n``).

    Each chunk reads and writes the accumulator once (8 V H bytes) against 6 c H V FLOPs of chunk
    matmuls: on an H100 (~750 TFLOP/s, ~3 TB/s) that overhead is ~330 / c of the LM head's time,
    4% at 8192 rows."""
    del v  # chunk logits [c, V] * itemsize == 2 * [V, H] * 4  <=>  c == 8 H / itemsize
    rows = min(8192, max(256, (8 * h // itemsize) // 256 * 256))
    return max(1, min(n, rows))


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _chunk_logits(h_c, weight):
    from ._triton import cross_entropy as kernels

    logits = torch.mm(h_c, weight.t())  # [c, V], fp32-accumulated, in the operand dtype
    return logits, kernels.logsumexp(logits)


def _chunk_grads(h_c, weight, logits, lse, labels_c, scale, ignore_index, gh_out, gw_acc):
    """Gradient of one chunk: ``dlogits`` over the logits, then ``dh = dlogits @ W`` and
    ``dW += dlogits.T @ h`` (both fp32-accumulated)."""
    from ._triton import cross_entropy as kernels

    dlogits = kernels.grad_logits(logits, lse, labels_c, scale, ignore_index, out=logits)
    if gh_out is not None:
        torch.mm(dlogits, weight, out=gh_out)
    if gw_acc is not None:
        _matmul.addmm_f32_(gw_acc, dlogits.t(), h_c)


def _run_chunks(hidden, weight, labels, ignore_index, chunk_size, scale=None, gh=None, gw=None):
    """Per-token loss [N] fp32, chunk by chunk. With ``scale`` (fp32, [1] or [N]: the factor on
    each token's gradient) also write ``gh`` [N, H] and accumulate ``gw`` [V, H] fp32 (either may
    be None)."""
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    for s, e in _chunks(n, chunk_size):
        logits, lse = _chunk_logits(hidden[s:e], weight)
        target = logits.gather(1, safe_labels[s:e, None]).squeeze(1).to(torch.float32)
        loss[s:e] = torch.where(valid[s:e], lse - target, torch.zeros_like(lse))
        if scale is not None:
            _chunk_grads(
                hidden[s:e],
                weight,
                logits,
                lse,
                labels[s:e],
                scale if scale.numel() == 1 else scale[s:e],
                ignore_index,
                None if gh is None else gh[s:e],
                gw,
            )
        del logits
    return loss


def _reduce(loss, labels, ignore_index, reduction):
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum()


def _grad_buffers(hidden, weight, need_h, need_w):
    gh = torch.empty_like(hidden) if need_h else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    return gh, gw


def _common_value(g: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """The value ``g`` takes on every ``valid`` token (0 when none is valid), or ``None`` when
    it varies. One host sync."""
    hi = torch.where(valid, g, float("-inf")).max()
    lo = torch.where(valid, g, float("inf")).min()
    lo_v, hi_v = torch.stack([lo, hi]).tolist()
    if lo_v > hi_v:  # no valid token: every gradient is zero anyway
        return g.new_zeros(())
    return hi if lo_v == hi_v else None


class _FusedLinearCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, grad_into):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.meta = (ignore_index, reduction, chunk_size, need_h, need_w)
        ctx.grad_into = grad_into if need_w else None
        ctx.speculated = reduction == "none" and SPECULATE["on"]
        if ctx.speculated:  # gradients for an upstream gradient of 1, rescaled in backward
            gh, gw = _grad_buffers(hidden, weight, need_h, need_w)
            unit = torch.ones(1, dtype=torch.float32, device=hidden.device)
            loss = _run_chunks(hidden, weight, labels, ignore_index, chunk_size, unit, gh, gw)
            ctx.save_for_backward(hidden, weight, labels, gh, gw)
            return loss
        if reduction == "none":  # backward recomputes with the per-token upstream gradient
            ctx.save_for_backward(hidden, weight, labels)
            return _run_chunks(hidden, weight, labels, ignore_index, chunk_size)
        if reduction == "mean":
            scale = 1.0 / (labels != ignore_index).sum().to(torch.float32).reshape(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
        gh, gw = _grad_buffers(hidden, weight, need_h, need_w)
        loss = _run_chunks(hidden, weight, labels, ignore_index, chunk_size, scale, gh, gw)
        if gw is not None and ctx.grad_into is None:  # else kept in fp32, rescaled into grad_into
            gw = gw.to(weight.dtype)
        ctx.save_for_backward(gh, gw)
        return _reduce(loss, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        ignore_index, reduction, chunk_size, need_h, need_w = ctx.meta
        into = ctx.grad_into
        if reduction != "none":  # precomputed in forward: only rescale
            gh, gw = ctx.saved_tensors
            gh = None if gh is None else gh * grad_out
            if gw is not None and into is not None:
                into.addcmul_(gw, grad_out)
                gw = None
            gw = None if gw is None else gw * grad_out
            return gh, gw, None, None, None, None, None
        if ctx.speculated:
            hidden, weight, labels, gh_unit, gw_unit = ctx.saved_tensors
            g = grad_out.to(torch.float32)
            common = _common_value(g, labels != ignore_index) if gw_unit is not None else g.new_zeros(())
            if common is not None:
                # one pass each: fp32 products written straight in the operands' dtype
                gh = None if gh_unit is None else torch.mul(gh_unit, g[:, None], out=torch.empty_like(hidden))
                gw = None
                if gw_unit is not None and into is not None:
                    into.addcmul_(gw_unit, common)
                elif gw_unit is not None:
                    gw = torch.mul(gw_unit, common, out=torch.empty_like(weight))
                return gh, gw, None, None, None, None, None
            SPECULATE["on"] = False
            warnings.warn("fused_linear_cross_entropy(reduction='none'): the upstream gradient differs "
                          "between non-ignored tokens; recomputing (and not speculating from now on)",
                          stacklevel=2)
            del gh_unit, gw_unit
        else:
            hidden, weight, labels = ctx.saved_tensors
        gh, gw = _grad_buffers(hidden, weight, need_h, need_w and into is None)
        scale = grad_out.to(torch.float32).contiguous()
        _run_chunks(hidden, weight, labels, ignore_index, chunk_size, scale, gh, into if gw is None else gw)
        return gh, (None if gw is None else gw.to(weight.dtype)), None, None, None, None, None


def fused_linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    weight_grad_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chunked path, unconditionally (CE pieces in Triton, matmuls in torch)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    h = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, H={h}], got {tuple(weight.shape)}")
    _check_grad_into(weight, weight_grad_into)
    hidden2d = hidden.reshape(-1, h)
    labels1d = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    n = hidden2d.shape[0]
    if labels1d.numel() != n:
        raise ValueError(f"{n} tokens in hidden but {labels1d.numel()} labels")
    if chunk_size is None:
        chunk_size = default_chunk_size(n, h, weight.shape[0], weight.element_size())
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = _FusedLinearCEFunction.apply(
            hidden2d, weight, labels1d, int(ignore_index), reduction, int(chunk_size), weight_grad_into
        )
    else:
        with torch.no_grad():
            per_token = _run_chunks(hidden2d, weight, labels1d, int(ignore_index), int(chunk_size))
            loss = _reduce(per_token, labels1d, ignore_index, reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    weight_grad_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked on CUDA; else the reference."""
    if hidden.numel() == 0 or hidden.dtype != weight.dtype or not use_triton(hidden, weight):
        return fused_linear_cross_entropy_reference(
            hidden, weight, labels, ignore_index, reduction, chunk_size, weight_grad_into
        )
    return fused_linear_cross_entropy_triton(hidden, weight, labels, ignore_index, reduction, chunk_size,
                                             weight_grad_into)
