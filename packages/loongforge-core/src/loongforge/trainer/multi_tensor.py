"""torch ``_foreach`` versions of the multi-tensor ops megatron-core's optimizers call.

Without Transformer Engine or apex, megatron-core falls back to per-tensor loops for the
gradient norm (one ``torch.norm`` per tensor, then ``torch.tensor(list)`` of device scalars:
a host sync per tensor), gradient clipping (``dst.copy_(src * scale)``: a temporary and two
passes per tensor) and the fp32-master -> bf16-parameter copy. On the Llama-3.2-1B shape that
is ~10 ms of a ~180 ms step on an H100. torch's ``_foreach`` ops do the same work in a few
multi-tensor kernels on any device. :func:`foreach_multi_tensor_ops` swaps them in while
active, only where megatron-core is using its own fallbacks (a TE or apex install keeps its
fused kernels).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


def apply(op, noop_flag, tensor_lists, *args):
    """``multi_tensor_applier``: the ops below need no chunking."""
    return op(None, noop_flag, tensor_lists, *args)


def l2norm(_chunk_size, _noop_flag, tensor_lists, per_tensor, *args):
    """``multi_tensor_l2norm``: the l2 norm of all tensors together, as a 1-element fp32 tensor
    on their device (no host sync)."""
    (tensors,) = tensor_lists
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1)
    return total, (torch.stack(norms) if per_tensor else None)


def scale(_chunk_size, _noop_flag, tensor_lists, factor):
    """``multi_tensor_scale``: ``dst = src * factor`` (in place when ``src`` is ``dst``; a plain
    dtype-converting copy when ``factor == 1``, megatron's fp32-master -> bf16 parameter copy)."""
    src, dst = tensor_lists
    if not src:
        return
    if src is dst or all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, factor)
    elif factor == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


@contextlib.contextmanager
def foreach_multi_tensor_ops():
    """Route megatron-core's optimizer multi-tensor fallbacks to :func:`l2norm`/:func:`scale`."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    with contextlib.ExitStack() as stack:
        if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
            for name, value in (("multi_tensor_applier", apply), ("l2_norm_impl", l2norm),
                                ("multi_tensor_scale_impl", scale)):
                stack.enter_context(mock.patch.object(clip_grads, name, value))
        if optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            stack.enter_context(mock.patch.object(optimizer, "multi_tensor_applier", apply))
            stack.enter_context(mock.patch.object(optimizer, "multi_tensor_scale_impl", scale))
        yield
