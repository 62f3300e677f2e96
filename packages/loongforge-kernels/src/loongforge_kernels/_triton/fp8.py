"""Triton kernels of :mod:`loongforge_kernels.fp8`: quantise rows, columns (written transposed) or
square blocks of a bf16/fp32 matrix to fp8 with fp32 scales, in one or two passes over the input.

Each program owns ``BLOCK_M`` rows (or ``BLOCK_K`` columns) and one scaling group; a group longer than
a tile is walked twice (absolute maximum, then the cast). Divisions round to nearest like torch's, and
the fp8 value is first rounded to nearest even in fp32 by bit arithmetic (:func:`_round_to_fp8`), so the
final cast is exact: scales and fp8 values equal the torch reference's bit for bit, compiled or in the
CPU interpreter (whose own fp32 -> fp8 cast is wrong for values between fp8 numbers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_FP8 = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}
AMAX_EPS = 1e-12
#: the same floor inside kernels (compiled Triton reads only constexpr globals; the interpreter reads any)
KERNEL_AMAX_EPS = tl.constexpr(AMAX_EPS)


@triton.jit
def _round_to_fp8(y, MANTISSA: tl.constexpr, MIN_NORMAL: tl.constexpr, SUBNORMAL_MAGIC: tl.constexpr):
    """``y`` (fp32, within the format's range) rounded to the nearest fp8 value, ties to even, still in
    fp32: normal numbers keep ``MANTISSA`` bits; below ``MIN_NORMAL`` the spacing is fixed, and adding
    and subtracting ``SUBNORMAL_MAGIC`` (1.5 * 2**(23 + log2 of the spacing)) rounds to it."""
    DROP: tl.constexpr = 23 - MANTISSA
    KEEP: tl.constexpr = (0xFFFFFFFF >> DROP) << DROP
    HALF: tl.constexpr = (1 << (DROP - 1)) - 1
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + HALF + ((bits >> DROP) & 1)) & KEEP
    normal = rounded.to(tl.float32, bitcast=True)
    magic = tl.zeros_like(y) + SUBNORMAL_MAGIC
    sub = (tl.abs(y) + magic) - magic  # on the magnitude: a negative value rounding to 0 stays -0
    sub = tl.where(y < 0, -sub, sub)
    return tl.where(tl.abs(y) < MIN_NORMAL, sub, normal)


@triton.jit
def _to_fp8(y, OUT: tl.constexpr):
    if OUT == tl.float8e4nv:
        r = _round_to_fp8(y, 3, 0.015625, 24576.0)  # e4m3: 2**-6, spacing 2**-9
    else:
        r = _round_to_fp8(y, 2, 6.103515625e-05, 192.0)  # e5m2: 2**-14, spacing 2**-16
    return r.to(OUT, fp_downcast_rounding="rtne")


@triton.jit
def _scale(amax, fmax):
    return tl.math.div_rn(tl.zeros_like(amax) + fmax, tl.maximum(amax, KERNEL_AMAX_EPS))


@triton.jit
def _rows_kernel(X, Q, S_INV, SCALE, M, K, group, n_groups, fmax,
                 HAS_SCALE: tl.constexpr, OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows[:, None] < M
    offs = rows[:, None].to(tl.int64) * K + g * group + tl.arange(0, BLOCK_K)[None, :]
    if HAS_SCALE:
        scale = tl.zeros([BLOCK_M, 1], tl.float32) + tl.load(SCALE)
    else:
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, group, BLOCK_K):
            x = tl.load(X + offs + k0, mask=rmask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        s = _scale(amax, fmax)
        tl.store(S_INV + rows.to(tl.int64) * n_groups + g, tl.math.div_rn(tl.zeros_like(s) + 1.0, s),
                 mask=rows < M)
        scale = s[:, None]
    for k0 in range(0, group, BLOCK_K):
        x = tl.load(X + offs + k0, mask=rmask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * scale, -fmax), fmax)
        tl.store(Q + offs + k0, _to_fp8(y, OUT), mask=rmask)


@triton.jit
def _cols_kernel(X, Q, S_INV, SCALE, M, K, group, n_groups, fmax,
                 SCALE_KIND: tl.constexpr, OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [M, K] -> q [K, M] with groups of ``group`` rows of x (columns of q). ``SCALE_KIND``: 0 the
    program computes its group's scales, 1 one given scale, 2 given per-column scales (``SCALE[K]``)."""
    pid_k = tl.program_id(0)
    g = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols[None, :] < K
    rows = g * group + tl.arange(0, BLOCK_M)
    in_offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    out_offs = cols[None, :].to(tl.int64) * M + rows[:, None]
    if SCALE_KIND == 1:
        scale = tl.zeros([1, BLOCK_K], tl.float32) + tl.load(SCALE)
    elif SCALE_KIND == 2:
        scale = tl.load(SCALE + cols, mask=cols < K, other=1.0)[None, :]
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for m0 in range(0, group, BLOCK_M):
            x = tl.load(X + in_offs + m0 * K, mask=cmask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        s = _scale(amax, fmax)
        tl.store(S_INV + cols.to(tl.int64) * n_groups + g, tl.math.div_rn(tl.zeros_like(s) + 1.0, s),
                 mask=cols < K)
        scale = s[None, :]
    for m0 in range(0, group, BLOCK_M):
        x = tl.load(X + in_offs + m0 * K, mask=cmask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * scale, -fmax), fmax)
        tl.store(Q + out_offs + m0, _to_fp8(y, OUT), mask=cmask)


@triton.jit
def _blocks_kernel(W, Q, QT, S_INV, N, K, fmax, TRANSPOSE: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr):
    bn = tl.program_id(0)
    bk = tl.program_id(1)
    rows = bn * BLOCK + tl.arange(0, BLOCK)
    cols = bk * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(W + rows[:, None].to(tl.int64) * K + cols[None, :]).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    s = tl.math.div_rn(amax * 0.0 + fmax, tl.maximum(amax, KERNEL_AMAX_EPS))
    tl.store(S_INV + bn * (K // BLOCK) + bk, tl.math.div_rn(s * 0.0 + 1.0, s))
    q = _to_fp8(tl.minimum(tl.maximum(w * s, -fmax), fmax), OUT)
    tl.store(Q + rows[:, None].to(tl.int64) * K + cols[None, :], q)
    if TRANSPOSE:
        tl.store(QT + cols[None, :].to(tl.int64) * N + rows[:, None], q)


def _tile(group: int, cap: int) -> int:
    """The largest power of two <= cap dividing ``group``."""
    return min(group & -group, cap)


def _fmax(dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize_rows(x, group, dtype, scale=None):
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    if scale is not None:  # one scale: any tiling; tiles of at most 128 columns keep the grid wide
        group = _tile(k, 128)
    n_groups = k // group
    s_inv = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    block_k = _tile(group, 128)
    block_m = max(1, min(64, 4096 // block_k, triton.next_power_of_2(m)))
    scale_t = scale.float().reshape(1) if scale is not None else s_inv
    _rows_kernel[(triton.cdiv(m, block_m), n_groups)](
        x, q, s_inv, scale_t, m, k, group, n_groups, _fmax(dtype),
        HAS_SCALE=scale is not None, OUT=_TL_FP8[dtype], BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    if scale is not None:
        return q, (1.0 / scale.float()).reshape(())
    return q, s_inv


#: a column group longer than this gets its scales from one torch reduction, then a wide grid
LONG_COLUMN = 1024


def quantize_cols(x, group, dtype, scale=None):
    m, k = x.shape
    q = torch.empty((k, m), dtype=dtype, device=x.device)
    kind, result_s = 0, None
    if scale is not None:
        kind, scale_t, group = 1, scale.float().reshape(1), _tile(m, 64)
        result_s = (1.0 / scale.float()).reshape(())
    elif group == m and m > LONG_COLUMN:
        # one group per column over all rows (rowwise): a grid over columns alone would be K / 128
        # programs; the scales come from one reduction (the reference's operations, so equal bits)
        amax = x.abs().amax(dim=0).float()
        scale_t = torch.tensor(_fmax(dtype), dtype=torch.float32, device=x.device) / amax.clamp_min(AMAX_EPS)
        kind, group, result_s = 2, _tile(m, 64), (1.0 / scale_t).reshape(k, 1)
    n_groups = m // group
    s_inv = torch.empty((k, n_groups), dtype=torch.float32, device=x.device) if kind == 0 else q
    if kind == 0:
        scale_t = s_inv
    block_m = _tile(group, 64)
    block_k = max(1, min(128, 8192 // block_m, triton.next_power_of_2(k)))
    _cols_kernel[(triton.cdiv(k, block_k), n_groups)](
        x, q, s_inv, scale_t, m, k, group, n_groups, _fmax(dtype),
        SCALE_KIND=kind, OUT=_TL_FP8[dtype], BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return (q, s_inv) if kind == 0 else (q, result_s)


def quantize_blocks(w, block, dtype, transpose=False):
    n, k = w.shape
    if block & (block - 1):
        raise ValueError(f"quantize_blocks: the Triton kernel needs a power-of-two block, got {block}")
    q = torch.empty((n, k), dtype=dtype, device=w.device)
    qt = torch.empty((k, n), dtype=dtype, device=w.device) if transpose else q
    s_inv = torch.empty((n // block, k // block), dtype=torch.float32, device=w.device)
    _blocks_kernel[(n // block, k // block)](
        w, q, qt, s_inv, n, k, _fmax(dtype), TRANSPOSE=transpose, OUT=_TL_FP8[dtype], BLOCK=block, num_warps=8)
    return (q, s_inv, qt) if transpose else (q, s_inv)
