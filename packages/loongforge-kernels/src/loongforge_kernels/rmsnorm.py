"""RMSNorm over the last dim: ``weight * (x * rsqrt(mean(x^2) + eps))``.

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


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from ._triton import rmsnorm as kernels

        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        weight_c = weight.contiguous()
        y, rstd = kernels.forward(x2d, weight_c, float(eps))
        ctx.save_for_backward(x2d, weight_c, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        from ._triton import rmsnorm as kernels

        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = kernels.backward(dy2d, x2d, weight, rstd)
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
