"""RMSNorm over the last dim: ``weight * (x * rsqrt(mean(x^2) + eps))``, alone or fused with the
pre-norm residual add (:func:`add_rms_norm`).

Numerics match HF ``LlamaRMSNorm`` (and Qwen3's): normalise in fp32, cast back to ``x.dtype``, then
multiply by ``weight``; the output dtype is ``promote(x.dtype, weight.dtype)``.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton

#: Longest row the fused kernel holds in registers; longer rows use the reference.
MAX_FUSED_DIM = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure-torch RMSNorm (HF ``LlamaRMSNorm.forward``)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """``t`` as a [M, D] view with unit stride on D (the kernels' layout), copying only if needed."""
    t2d = t.reshape(-1, d)
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from ._triton import rmsnorm as kernels

        shape = x.shape
        x2d = _rows(x, shape[-1])
        weight_c = weight.contiguous()
        y, rstd = kernels.forward(x2d, weight_c, float(eps))
        ctx.save_for_backward(x2d, weight_c, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        from ._triton import rmsnorm as kernels

        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = kernels.backward(_rows(dy, x2d.shape[-1]), x2d, weight, rstd)
        return dx.view(ctx.shape), (dw if ctx.needs_input_grad[1] else None), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The fused path, unconditionally (fwd and bwd in Triton)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} != last dim of x {tuple(x.shape)}")
    return _RMSNormFunction.apply(x, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim; Triton on CUDA, else :func:`rms_norm_reference`."""
    if x.numel() == 0 or x.shape[-1] > MAX_FUSED_DIM or not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps)
    return rms_norm_triton(x, weight, eps)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch residual add then RMSNorm: ``(rms_norm_reference(h, weight, eps), h)``,
    ``h = x + residual``."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


class _AddRMSNormFunction(torch.autograd.Function):
    """One kernel each way: forward writes h and y; backward writes dx = dh + dnorm(dy) once and
    returns it for both inputs (as autograd's add does). Saves h (an output the caller keeps as
    the next residual anyway), the weight and rstd [M] fp32."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        from ._triton import rmsnorm as kernels

        shape = x.shape
        weight_c = weight.contiguous()
        d = shape[-1]
        y, h, rstd = kernels.add_forward(_rows(x, d), _rows(residual, d), weight_c, float(eps), shape)
        ctx.save_for_backward(h, weight_c, rstd)
        ctx.set_materialize_grads(False)  # a None dy or dh skips its part instead of adding zeros
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        from ._triton import rmsnorm as kernels

        h, weight, rstd = ctx.saved_tensors
        d = h.shape[-1]
        dw = None
        if dy is None:
            dx = dh
        else:
            dres = None if dh is None else _rows(dh, d)
            dx, dw = kernels.backward(_rows(dy, d), h.view(-1, d), weight, rstd, dres)
            dx = dx.view(h.shape)
        need_x, need_res, need_w = ctx.needs_input_grad[:3]
        return (dx if need_x else None), (dx if need_res else None), (dw if need_w else None), None


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused path, unconditionally (fwd and bwd in Triton)."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
            f"x {tuple(x.shape)} {x.dtype} in shape and dtype"
        )
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} != last dim of x {tuple(x.shape)}")
    return _AddRMSNormFunction.apply(x, residual, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(h, weight, eps), h)`` with ``h = x + residual`` rounded to x's dtype, in one kernel
    each way; Triton on CUDA, else :func:`add_rms_norm_reference`. Results equal the unfused torch
    ops; the backward returns ``dh + d(rms_norm)/dh`` for both x and residual, and dweight.
    Inputs the kernel does not cover (broadcast or mixed-dtype residual) take the reference."""
    if (
        x.numel() == 0
        or x.shape[-1] > MAX_FUSED_DIM
        or residual.shape != x.shape
        or residual.dtype != x.dtype
        or not use_triton(x, residual, weight)
    ):
        return add_rms_norm_reference(x, residual, weight, eps)
    return add_rms_norm_triton(x, residual, weight, eps)
