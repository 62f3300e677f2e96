"""torch ``_foreach`` versions of the multi-tensor ops megatron-core's optimizers call.

Without Transformer Engine or apex, megatron-core falls back to per-tensor loops for the
gradient norm (one ``torch.norm`` per tensor, then ``torch.tensor(list)`` of device scalars:
a host sync per tensor), gradient clipping (``dst.copy_(src * scale)``: a temporary and two
passes per tensor) and the fp32-master -> bf16-parameter copy. On the Llama-3.2-1B shape that
is ~10 ms of a ~180 ms step on an H100. torch's ``_foreach`` ops do the same work in a few
multi-tensor kernels on any device. :func:`foreach_multi_tensor_ops` swaps them in while
active, only where megatron-core is using its own fallbacks (a TE or apex install keeps its
fused kernels).

megatron-core keeps the gradient norm a device tensor only when a tensor-factor scale exists (TE's);
otherwise it calls ``.item()`` on it, and the GPU idles while the host prepares the optimizer step
(~1.3 ms a step on an H100 at the 1B shape). :func:`scale` serves both.

Clipping itself is one more read and write of every fp32 gradient (3.3 ms a step at 1.2B
parameters on an H100). When the clipped gradients go to torch's fused AdamW and nowhere else,
:func:`fold_clipping_into` lets the clip hand its factor to that kernel instead (its
``grad_scale``: gradients are divided by it as they are read), while the context is active.
"""

from __future__ import annotations

import contextlib
import weakref
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
    """``multi_tensor_scale`` (``factor`` a float) and ``multi_tensor_scale_tensor`` (a 1-element
    device tensor, read on the device): ``dst = src * factor`` (in place when ``src`` is ``dst``; a
    plain dtype-converting copy when ``factor == 1.0``, megatron's fp32-master -> bf16 parameter copy)."""
    src, dst = tensor_lists
    if not src:
        return
    if isinstance(factor, torch.Tensor):
        factor = factor.reshape(())  # torch's foreach ops take 0-dim scalar tensors
    if src is dst or all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, factor)
    elif isinstance(factor, float) and factor == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


def fold_clipping_into(torch_optimizer: torch.optim.Optimizer) -> None:
    """Let gradient clipping of exactly ``torch_optimizer``'s parameters become its ``grad_scale``
    (for optimizers whose every step reads it: torch's fused Adam/AdamW in all groups, or
    ``optim.KernelAdamW``)."""
    owner = weakref.ref(torch_optimizer)
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            param._loongforge_clip_owner = owner
    if not getattr(torch_optimizer, "_loongforge_clip_hook", False):
        # the factor belongs to one step: drop it once the step has read it
        torch_optimizer.register_step_post_hook(lambda opt, *_: opt.__dict__.pop("grad_scale", None))
        torch_optimizer._loongforge_clip_hook = True


def _folding_owner(params: list):
    """The torch optimizer that can take the clip of ``params`` as its ``grad_scale``, or None."""
    refs = {getattr(p, "_loongforge_clip_owner", None) for p in params}
    opt = next(iter(refs))() if len(refs) == 1 and None not in refs else None
    # torch's Adam reads grad_scale only on its fused path (groups loaded from a checkpoint may not be)
    if opt is None or not (getattr(opt, "reads_grad_scale", False) or all(g.get("fused") for g in opt.param_groups)):
        return None
    owned = {id(p) for g in opt.param_groups for p in g["params"] if p.grad is not None}
    return opt if owned == {id(p) for p in params} else None


def clip_by_total_norm(original):
    """megatron-core's ``clip_grad_by_total_norm_fp32``, handing the factor to a fused AdamW that
    owns exactly these parameters (:func:`fold_clipping_into`); else ``original``."""

    def clip(parameters, max_norm, total_norm, use_decoupled_grad=False):
        params = [p for p in parameters if p.grad is not None]
        opt = None if use_decoupled_grad or not params else _folding_owner(params)
        if opt is None:
            return original(parameters, max_norm, total_norm, use_decoupled_grad=use_decoupled_grad)
        coeff = max_norm / (total_norm + 1.0e-6)
        if isinstance(coeff, torch.Tensor):
            opt.grad_scale = 1.0 / coeff.clamp_max(1.0).reshape(1).float()
        elif coeff < 1.0:
            opt.grad_scale = torch.full((1,), 1.0 / coeff, dtype=torch.float32, device=params[0].grad.device)

    return clip


@contextlib.contextmanager
def foreach_multi_tensor_ops():
    """Route megatron-core's optimizer multi-tensor fallbacks to :func:`l2norm`/:func:`scale`, and
    its clipping to :func:`clip_by_total_norm`."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(
            optimizer, "clip_grad_by_total_norm_fp32", clip_by_total_norm(optimizer.clip_grad_by_total_norm_fp32)))
        if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
            for name, value in (("multi_tensor_applier", apply), ("l2_norm_impl", l2norm),
                                ("multi_tensor_scale_impl", scale)):
                stack.enter_context(mock.patch.object(clip_grads, name, value))
        if clip_grads.multi_tensor_scale_tensor_impl is None:
            # with a tensor-factor scale megatron keeps the gradient norm on the device
            # (no host sync between backward and the optimizer kernel)
            stack.enter_context(mock.patch.object(clip_grads, "multi_tensor_scale_tensor_impl", scale))
        if optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            stack.enter_context(mock.patch.object(optimizer, "multi_tensor_applier", apply))
            stack.enter_context(mock.patch.object(optimizer, "multi_tensor_scale_impl", scale))
        yield
