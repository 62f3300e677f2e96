"""RMSNorm forward/backward kernels over the last dim of a ``[M, D]`` view, optionally fused with
the pre-norm residual add (``h = x + r`` written out and normalised in the same pass).

Numerics follow HF ``LlamaRMSNorm``: normalise in fp32, round to the input dtype, then multiply by
the weight in the promoted dtype ``P``. The backward reproduces the rounding points of autograd on
that reference (``dy * w`` and ``dy * n`` rounded to ``P``), accumulating in fp32; with a residual
gradient ``dh`` it is added to the norm's input gradient in fp32 before the single rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import next_pow2, num_programs


@triton.jit
def _rmsnorm_fwd_kernel(
    X,
    R,
    W,
    Y,
    H,
    RSTD,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # h = x + r rounded to x's dtype (torch's same-dtype add); the norm reads the rounded h.
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * n).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DRES,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dres,
    stride_dx,
    M,
    D,
    rows_per_program,
    HAS_DRES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Advance 64-bit pointers row by row (the loop index is a plain int in the interpreter).
    start = row_start.to(tl.int64)
    x_ptr = X + start * stride_x + cols
    dy_ptr = DY + start * stride_dy + cols
    dx_ptr = DX + start * stride_dx + cols
    rstd_ptr = RSTD + start
    if HAS_DRES:
        dres_ptr = DRES + start * stride_dres + cols
    for _ in range(row_start, row_end):
        x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        n = x * rstd
        n_cast = n.to(X.dtype.element_ty).to(tl.float32)
        dw += (dy * n_cast).to(DY.dtype.element_ty).to(tl.float32)
        g = (dy * w).to(DY.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / D))
        if HAS_DRES:
            dx += tl.load(dres_ptr, mask=mask, other=0.0).to(tl.float32)
            dres_ptr += stride_dres
        tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
        rstd_ptr += 1
    tl.store(DW_PART + pid.to(tl.int64) * D + cols, dw, mask=mask)


def _warps(block: int) -> int:
    return 4 if block < 2048 else (8 if block < 8192 else 16)


def add_forward(x2d: torch.Tensor, r2d: torch.Tensor | None, weight: torch.Tensor, eps: float, shape=None):
    """``x2d``, ``r2d`` [M, D] of one dtype (unit stride on D) -> (y = rms_norm(h), h = x + r in
    x's dtype, rstd [M] fp32); without ``r2d`` h is x itself and not written (returned as None).
    y and h are new contiguous tensors of ``shape`` (default [M, D]), not views, so callers may
    return them from an autograd Function and modify them in place."""
    m, d = x2d.shape
    shape = shape or (m, d)
    out_dtype = torch.promote_types(x2d.dtype, weight.dtype)
    y_out = torch.empty(shape, dtype=out_dtype, device=x2d.device)
    h_out = None if r2d is None else torch.empty(shape, dtype=x2d.dtype, device=x2d.device)
    y = y_out.view(m, d)
    h = None if h_out is None else h_out.view(m, d)
    rstd = torch.empty((m,), dtype=torch.float32, device=x2d.device)
    block = next_pow2(d)
    _rmsnorm_fwd_kernel[(m,)](
        x2d,
        r2d,
        weight,
        y,
        h,
        rstd,
        x2d.stride(0),
        0 if r2d is None else r2d.stride(0),
        y.stride(0),
        0 if h is None else h.stride(0),
        d,
        eps,
        HAS_RESIDUAL=r2d is not None,
        BLOCK_D=block,
        num_warps=_warps(block),
    )
    return y_out, h_out, rstd


def forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """``x2d`` [M, D] (unit stride on D) -> (y [M, D] in the promoted dtype, rstd [M] fp32)."""
    y, _, rstd = add_forward(x2d, None, weight, eps)
    return y, rstd


def backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dres2d: torch.Tensor | None = None,
):
    """-> (dx [M, D] in x's dtype, dw [D] in weight's dtype); ``dres2d`` (the gradient reaching the
    norm's input by another path, e.g. the residual stream) is added to dx in the same pass."""
    m, d = x2d.shape
    dx = torch.empty((m, d), dtype=x2d.dtype, device=x2d.device)
    programs = max(1, min(m, num_programs(x2d.device)))
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    dw_part = torch.empty((programs, d), dtype=torch.float32, device=x2d.device)
    block = next_pow2(d)
    _rmsnorm_bwd_kernel[(programs,)](
        dy2d,
        x2d,
        weight,
        rstd,
        dres2d,
        dx,
        dw_part,
        dy2d.stride(0),
        x2d.stride(0),
        0 if dres2d is None else dres2d.stride(0),
        dx.stride(0),
        m,
        d,
        rows_per_program,
        HAS_DRES=dres2d is not None,
        BLOCK_D=block,
        num_warps=_warps(block),
    )
    return dx, dw_part.sum(0).to(weight.dtype)
