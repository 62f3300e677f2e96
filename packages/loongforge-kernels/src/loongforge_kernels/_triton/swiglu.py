"""SwiGLU kernels on a ``[M, 2F]`` view holding ``[gate | up]`` (megatron fc1 layout).

Everything is computed in fp32 and rounded once on store, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import next_pow2


@triton.jit
def _swiglu_fwd_kernel(X, Y, stride_x, stride_y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    x_row = X + row * stride_x
    g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, X, DX, stride_dy, stride_x, stride_dx, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    x_row = X + row * stride_x
    g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + F + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    dx_row = DX + row * stride_dx
    tl.store(dx_row + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_row + F + cols, du.to(DX.dtype.element_ty), mask=mask)


def _block(f: int) -> int:
    return min(1024, next_pow2(f))


def forward(x2d: torch.Tensor) -> torch.Tensor:
    m, two_f = x2d.shape
    f = two_f // 2
    y = torch.empty((m, f), dtype=x2d.dtype, device=x2d.device)
    block = _block(f)
    _swiglu_fwd_kernel[(m, triton.cdiv(f, block))](x2d, y, x2d.stride(0), y.stride(0), f, BLOCK=block)
    return y


def backward(dy2d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    m, two_f = x2d.shape
    f = two_f // 2
    dx = torch.empty((m, two_f), dtype=x2d.dtype, device=x2d.device)
    block = _block(f)
    _swiglu_bwd_kernel[(m, triton.cdiv(f, block))](
        dy2d, x2d, dx, dy2d.stride(0), x2d.stride(0), dx.stride(0), f, BLOCK=block
    )
    return dx
