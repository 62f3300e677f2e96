"""SwiGLU on megatron's fused fc1 output: ``x = [gate | up]`` on the last dim -> ``silu(gate) * up``.

Computed in fp32 and rounded once to ``x.dtype`` (the reference upcasts likewise), so the fused
kernel and the reference agree to fp32 rounding before the final cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch SwiGLU: ``silu(x[..., :F]) * x[..., F:]`` in fp32, returned in ``x.dtype``."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return (F.silu(gate.to(torch.float32)) * up.to(torch.float32)).to(x.dtype)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        from ._triton import swiglu as kernels

        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y = kernels.forward(x2d)
        ctx.save_for_backward(x2d)
        ctx.shape = shape
        return y.view(*shape[:-1], shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        from ._triton import swiglu as kernels

        (x2d,) = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[-1] // 2)
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        return kernels.backward(dy2d, x2d).view(ctx.shape)


def swiglu_triton(x: torch.Tensor) -> torch.Tensor:
    """The fused path, unconditionally (fwd and bwd in Triton)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim, got {tuple(x.shape)}")
    return _SwiGLUFunction.apply(x)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU; Triton on CUDA, else :func:`swiglu_reference`."""
    if x.numel() == 0 or not use_triton(x):
        return swiglu_reference(x)
    return swiglu_triton(x)
