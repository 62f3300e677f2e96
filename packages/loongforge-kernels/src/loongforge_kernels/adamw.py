"""AdamW over a list of fp32 master params that also refreshes their low-precision model copies.

A mixed-precision step otherwise runs torch's fused AdamW (which, given the clip factor as
``grad_scale``, also writes the unscaled gradient back) and then one fp32 -> bf16 copy kernel per
parameter. :func:`adamw_step` does both in one bandwidth-bound pass over all tensors: it reads
p, g, m, v and writes p, m, v and the model param, and never writes g.

Numerics are ``torch.optim.AdamW``'s (``foreach=False, fused=False``): decoupled weight decay
``p *= 1 - lr * wd`` first, ``m.lerp_(g, 1 - beta1)``, ``v = beta2 * v + (1 - beta2) * g * g``,
``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` with the bias corrections of ``step``. The
hyper-parameters are Python numbers and ``grad_scale`` a device tensor, so nothing syncs with the
host.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, model_params, *, lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float, step: int,
                         grad_scale: torch.Tensor | None = None) -> None:
    """Pure-torch :func:`adamw_step`: the operations of ``torch.optim.adam._single_tensor_adam``."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    scale = None if grad_scale is None else grad_scale.reshape(())
    for p, g, m, v, mp in zip(params, grads, exp_avgs, exp_avg_sqs, model_params, strict=True):
        if scale is not None:
            g = g / scale
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(eps), value=-step_size)
        if mp is not None:
            mp.copy_(p)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, model_params, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, grad_scale: torch.Tensor | None = None) -> None:
    """In place, for each i: torch.optim.AdamW's update of ``params[i]`` (fp32) with
    ``grads[i] / grad_scale`` (``grad_scale``: a 1-element fp32 device tensor, or None),
    ``exp_avgs[i]``, ``exp_avg_sqs[i]`` (fp32) and the bias corrections of ``step`` (1-based, the
    step being taken); then ``model_params[i].copy_(params[i])`` where ``model_params[i]`` is not
    None (fp32/bf16/fp16, one dtype per call, rounded to nearest even). ``grads`` are not modified.

    Triton path (one launch for all tensors) on CUDA, else :func:`adamw_step_reference`. The Triton
    path needs contiguous tensors and caches device address tables per distinct set of tensors
    (keyed by their addresses and sizes), so pass the same, persistent tensors every step.
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(model_params) == n):
        raise ValueError(f"adamw_step: lists of different lengths: params {n}, grads {len(grads)}, exp_avgs "
                         f"{len(exp_avgs)}, exp_avg_sqs {len(exp_avg_sqs)}, model_params {len(model_params)}")
    if n == 0:
        return
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                  grad_scale=grad_scale)
    if not use_triton(params[0]):
        adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, model_params, **kwargs)
        return
    from ._triton import adamw as kernels

    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.dtype != torch.float32):
        raise ValueError(f"adamw_step: grad_scale must be a 1-element fp32 tensor, got {grad_scale.dtype} "
                         f"{tuple(grad_scale.shape)}")
    kernels.adamw_step(params, grads, exp_avgs, exp_avg_sqs, model_params, **kwargs)
