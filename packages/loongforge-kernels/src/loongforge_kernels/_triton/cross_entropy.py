"""Softmax cross-entropy pieces on one chunk of logits ``[C, V]`` (fp32 math on any float dtype).

Both kernels split each row into ``BLOCK_V`` column blocks (grid ``[C, V / BLOCK_V]``) so a small
chunk still fills the GPU: one writes per-block (max, sum of exp), combined into the log-sum-exp in
torch (``[C, blocks]`` is tiny); the other writes ``(softmax - onehot) * scale`` for each element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import next_pow2

#: Column block on the interpreter; small so CPU tests cover several blocks per row.
BLOCK_V_INTERPRETED = 128
BLOCK_V_CUDA = 4096


@triton.jit
def _lse_partial_kernel(LOGITS, PMAX, PSUM, stride_l, V, n_blocks, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(LOGITS + row * stride_l + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    s = tl.sum(tl.exp(x - m_safe), axis=0)
    tl.store(PMAX + row * n_blocks + blk, m)
    tl.store(PSUM + row * n_blocks + blk, s)


@triton.jit
def _ce_grad_kernel(
    LOGITS,
    GRAD,
    LSE,
    LABELS,
    SCALE,
    stride_l,
    stride_g,
    stride_scale,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row * stride_scale)
    x = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
    g = tl.where(label == ignore_index, 0.0, g * scale)
    tl.store(GRAD + row * stride_g + cols, g.to(GRAD.dtype.element_ty), mask=mask)


def _block_v(logits: torch.Tensor) -> int:
    cap = BLOCK_V_CUDA if logits.is_cuda else BLOCK_V_INTERPRETED
    return min(cap, next_pow2(logits.shape[1]))


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp of ``logits`` [C, V] (unit stride on V) -> [C] fp32."""
    c, v = logits.shape
    block = _block_v(logits)
    n_blocks = triton.cdiv(v, block)
    pmax = torch.empty((c, n_blocks), dtype=torch.float32, device=logits.device)
    psum = torch.empty_like(pmax)
    _lse_partial_kernel[(c, n_blocks)](
        logits, pmax, psum, logits.stride(0), v, n_blocks, BLOCK_V=block, num_warps=8
    )
    m = pmax.amax(dim=1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    return (m + torch.log((psum * torch.exp(pmax - m)).sum(dim=1, keepdim=True))).squeeze(1)


def grad_logits(
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out = (softmax(logits) - onehot(labels)) * scale``, zero on ignored rows.

    ``scale`` is fp32, one value (shape [1]) or one per row ([C]). ``out`` may alias ``logits``.
    """
    c, v = logits.shape
    block = _block_v(logits)
    stride_scale = 0 if scale.numel() == 1 else scale.stride(0)
    _ce_grad_kernel[(c, triton.cdiv(v, block))](
        logits,
        out,
        lse,
        labels,
        scale,
        logits.stride(0),
        out.stride(0),
        stride_scale,
        v,
        ignore_index,
        BLOCK_V=block,
        num_warps=8,
    )
    return out
