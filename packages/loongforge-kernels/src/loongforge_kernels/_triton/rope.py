"""Rotate-half RoPE on ``[S, B, H, D]``, optionally preceded by a per-head RMSNorm (QK-norm).

The input (and, in backward, the input gradient) may also be a grouped ``[S, B, G, H/G, D]`` view
with its own group stride: the query heads inside megatron's fused QKV tensor, read and written in
place of a reshape copy and a concatenation.

One program handles a block of heads of one ``(s, b)``, so cos/sin are loaded once per block;
they are ``[S, B, R]`` views, a zero stride on ``B`` sharing one row of angles across the batch. The
rotated partner of lane ``d`` is ``d +/- R/2`` (``R`` = rotary dim, ``R <= D``; lanes ``>= R`` pass
through). RoPE runs in fp32 and rounds once; with the norm, the normalised tensor is first rounded
exactly where the reference rounds it (``x.dtype``, then ``promote(x, weight)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import next_pow2, num_programs


@triton.jit
def _head_offsets(heads, HPG, stride_g, stride_h):
    """[BLOCK_H, 1] element offsets of heads laid out as ``groups x HPG`` (megatron's fused QKV
    puts each group's query heads, then its k and v heads, in one row)."""
    heads = heads[:, None].to(tl.int64)
    return (heads // HPG) * stride_g + (heads % HPG) * stride_h


@triton.jit
def _rope_fwd_kernel(
    X,
    W,
    COS,
    SIN,
    Y,
    RSTD,
    stride_xs,
    stride_xb,
    stride_xg,
    stride_xh,
    stride_ys,
    stride_yb,
    stride_yh,
    stride_cs,
    stride_cb,
    stride_ss,
    stride_sb,
    B,
    H,
    HPG,
    D,
    HALF,
    R,
    eps,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = heads < H
    d_mask = d < D
    mask = h_mask[:, None] & d_mask[None, :]
    rot = d < R
    partner = tl.where(rot, tl.where(d < HALF, d + HALF, d - HALF), d)
    sign = tl.where(d < HALF, -1.0, 1.0)
    p_mask = mask & rot[None, :]

    x_rows = X + s * stride_xs + b * stride_xb + _head_offsets(heads, HPG, stride_xg, stride_xh)
    x = tl.load(x_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_rows + partner[None, :], mask=p_mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(RSTD + (s * B + b) * H + heads, rstd, mask=h_mask)
        w = tl.load(W + d, mask=d_mask, other=0.0).to(tl.float32)
        wp = tl.load(W + partner, mask=d_mask & rot, other=0.0).to(tl.float32)
        n = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        np_ = (xp * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        x = (w[None, :] * n).to(Y.dtype.element_ty).to(tl.float32)
        xp = (wp[None, :] * np_).to(Y.dtype.element_ty).to(tl.float32)
    # Outside the rotary dim cos=1, sin=0, so those lanes pass through unchanged.
    c = tl.load(COS + s * stride_cs + b * stride_cb + d, mask=rot, other=1.0).to(tl.float32)
    sn = tl.load(SIN + s * stride_ss + b * stride_sb + d, mask=rot, other=0.0).to(tl.float32)
    y = x * c[None, :] + sign[None, :] * xp * sn[None, :]
    y_rows = Y + s * stride_ys + b * stride_yb + heads[:, None].to(tl.int64) * stride_yh
    tl.store(y_rows + d[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_bwd_kernel(
    DY,
    X,
    W,
    COS,
    SIN,
    RSTD,
    DX,
    DW_PART,
    stride_dys,
    stride_dyb,
    stride_dyh,
    stride_xs,
    stride_xb,
    stride_xg,
    stride_xh,
    stride_dxs,
    stride_dxb,
    stride_dxg,
    stride_dxh,
    stride_cs,
    stride_cb,
    stride_ss,
    stride_sb,
    S,
    B,
    H,
    HPG,
    D,
    HALF,
    R,
    s_per_program,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ps = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hb = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = heads < H
    d_mask = d < D
    mask = h_mask[:, None] & d_mask[None, :]
    rot = d < R
    partner = tl.where(rot, tl.where(d < HALF, d + HALF, d - HALF), d)
    sign = tl.where(d < HALF, -1.0, 1.0)
    p_mask = mask & rot[None, :]
    heads64 = heads[:, None].to(tl.int64)

    s_start = ps * s_per_program
    s_end = tl.minimum(s_start + s_per_program, S)
    s0 = s_start.to(tl.int64)
    # 64-bit pointers advanced per position (the loop index is a plain int in the interpreter).
    dy_rows = DY + s0 * stride_dys + b * stride_dyb + heads64 * stride_dyh
    x_rows = X + s0 * stride_xs + b * stride_xb + _head_offsets(heads, HPG, stride_xg, stride_xh)
    dx_rows = DX + s0 * stride_dxs + b * stride_dxb + _head_offsets(heads, HPG, stride_dxg, stride_dxh)
    cos_row = COS + s0 * stride_cs + b * stride_cb
    sin_row = SIN + s0 * stride_ss + b * stride_sb
    rstd_ptr = RSTD + (s0 * B + b) * H + heads
    if HAS_NORM:
        w = tl.load(W + d, mask=d_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for _ in range(s_start, s_end):
        g = tl.load(dy_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
        gp = tl.load(dy_rows + partner[None, :], mask=p_mask, other=0.0).to(tl.float32)
        c = tl.load(cos_row + d, mask=rot, other=1.0).to(tl.float32)
        sn_p = tl.load(sin_row + partner, mask=rot, other=0.0).to(tl.float32)
        # out_k = y_k c_k + sign_k y_p(k) s_k  =>  dy_j = g_j c_j - sign_j g_p(j) s_p(j)
        gy = g * c[None, :] - sign[None, :] * gp * sn_p[None, :]
        if HAS_NORM:
            gy = gy.to(DY.dtype.element_ty).to(tl.float32)
            x = tl.load(x_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr, mask=h_mask, other=0.0)
            n = x * rstd[:, None]
            n_cast = n.to(X.dtype.element_ty).to(tl.float32)
            dw += tl.sum((gy * n_cast).to(DY.dtype.element_ty).to(tl.float32), axis=0)
            gn = (gy * w[None, :]).to(DY.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
            dx = rstd[:, None] * (gn - n * (tl.sum(gn * n, axis=1) / D)[:, None])
        else:
            dx = gy
        tl.store(dx_rows + d[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dy_rows += stride_dys
        x_rows += stride_xs
        dx_rows += stride_dxs
        cos_row += stride_cs
        sin_row += stride_ss
        rstd_ptr += B * H
    if HAS_NORM:
        n_hb = tl.num_programs(2)
        slot = (ps.to(tl.int64) * B + b) * n_hb + hb
        tl.store(DW_PART + slot * D + d, dw, mask=d_mask)


def _blocks(h: int, d: int) -> tuple[int, int]:
    block_d = next_pow2(d)
    block_h = max(1, min(next_pow2(h), 4096 // block_d))
    return block_h, block_d


def _group_size(*tensors: torch.Tensor) -> int:
    """Heads per group: that of the grouped [S, B, G, H/G, D] tensors among ``tensors`` (all the
    same), else all heads."""
    sizes = {t.shape[3] for t in tensors if t.dim() == 5}
    if len(sizes) > 1:
        raise ValueError(f"grouped views disagree on heads per group: {sorted(sizes)}")
    return sizes.pop() if sizes else tensors[0].shape[-2]


def _head_strides(t: torch.Tensor, hpg: int) -> tuple[int, int]:
    """(group stride, head stride) of ``t`` ([S, B, H, D] or [S, B, G, hpg, D]) for groups of ``hpg`` heads."""
    if t.dim() == 5:
        return t.stride(2), t.stride(3)
    return hpg * t.stride(2), t.stride(2)


def forward(x, cos, sin, weight=None, eps: float = 0.0):
    """x [S, B, H, D] or grouped [S, B, G, H/G, D] (unit stride on D); cos/sin [S, B, R] (unit
    stride on R, any on S and B).

    Returns (y contiguous [S, B, H, D], rstd [S, B, H] fp32 or None).
    """
    s, b, d = x.shape[0], x.shape[1], x.shape[-1]
    h = x.shape[2] * x.shape[3] if x.dim() == 5 else x.shape[2]
    hpg = _group_size(x)
    stride_xg, stride_xh = _head_strides(x, hpg)
    r = cos.shape[-1]
    has_norm = weight is not None
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if has_norm else x.dtype
    y = torch.empty((s, b, h, d), dtype=out_dtype, device=x.device)
    rstd = torch.empty((s, b, h), dtype=torch.float32, device=x.device) if has_norm else None
    block_h, block_d = _blocks(h, d)
    grid = (s, b, triton.cdiv(h, block_h))
    _rope_fwd_kernel[grid](
        x,
        weight if has_norm else x,
        cos,
        sin,
        y,
        rstd if has_norm else y,
        x.stride(0),
        x.stride(1),
        stride_xg,
        stride_xh,
        y.stride(0),
        y.stride(1),
        y.stride(2),
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
        b,
        h,
        hpg,
        d,
        r // 2,
        r,
        eps,
        HAS_NORM=has_norm,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
    )
    return y, rstd


def backward(dy, cos, sin, dx_dtype, x=None, weight=None, rstd=None, out=None):
    """dy [S, B, H, D] (unit stride on D) -> (dx in ``dx_dtype``, dweight [D] or None).

    ``x``, ``weight`` and ``rstd`` (from :func:`forward`) are needed only with the norm. ``out``:
    where to write dx ([S, B, H, D] or grouped [S, B, G, H/G, D], unit stride on D) instead of a
    new tensor.
    """
    s, b, h, d = dy.shape
    r = cos.shape[-1]
    has_norm = weight is not None
    x_arg = x if has_norm else dy  # unread without the norm
    dx = torch.empty((s, b, h, d), dtype=dx_dtype, device=dy.device) if out is None else out
    hpg = _group_size(x_arg, dx)
    stride_xg, stride_xh = _head_strides(x_arg, hpg)
    stride_dxg, stride_dxh = _head_strides(dx, hpg)
    block_h, block_d = _blocks(h, d)
    n_hb = triton.cdiv(h, block_h)
    if has_norm:  # loop over positions so the weight gradient needs few partial rows
        programs_s = max(1, min(s, num_programs(dy.device) // (b * n_hb)))
        s_per_program = triton.cdiv(s, programs_s)
        programs_s = triton.cdiv(s, s_per_program)
        dw_part = torch.empty((programs_s * b * n_hb, d), dtype=torch.float32, device=dy.device)
    else:
        programs_s, s_per_program, dw_part = s, 1, dx
    _rope_bwd_kernel[(programs_s, b, n_hb)](
        dy,
        x_arg,
        weight if has_norm else dy,
        cos,
        sin,
        rstd if has_norm else dx,
        dx,
        dw_part,
        dy.stride(0),
        dy.stride(1),
        dy.stride(2),
        x_arg.stride(0),
        x_arg.stride(1),
        stride_xg,
        stride_xh,
        dx.stride(0),
        dx.stride(1),
        stride_dxg,
        stride_dxh,
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
        s,
        b,
        h,
        hpg,
        d,
        r // 2,
        r,
        s_per_program,
        HAS_NORM=has_norm,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
    )
    dw = dw_part.sum(0).to(weight.dtype) if has_norm else None
    return dx, dw
