"""Self-attention ``softmax(q k^T * scale [+ causal mask]) v`` on ``[B, H, S, D]``, grouped KV heads.

:func:`flash_attention_triton` runs the Triton kernels (``_triton/flash_attention.py``) where
:func:`unsupported` has nothing to say, else raises ``RuntimeError`` naming why -- the CUDA
backend's per-shape kernel timing treats that as "no kernel for this input" and moves on.
:func:`flash_attention_reference` is the same computation in fp32 with torch ops.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import interpreting, use_triton

#: every autotune config's block sizes divide this (no tail handling in the kernels)
SEQ_MULTIPLE = 128


def flash_attention_reference(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """fp32 softmax attention, KV heads repeated for the query heads of their group."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    s = q.float() @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)


def unsupported(q, k, v, causal: bool) -> str | None:
    """Why the kernels cannot take these inputs, or None."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not [B, H, S, D] self-attention"
    (_, h, s_q, d), (h_kv, s_k) = q.shape, k.shape[1:3]
    if h % h_kv:
        return f"{h} query heads are not a multiple of {h_kv} KV heads"
    if d not in (16, 32, 64, 128):
        return f"head dim {d} is not 16, 32, 64 or 128"
    if s_q % SEQ_MULTIPLE or s_k % SEQ_MULTIPLE or (causal and s_q != s_k):
        return f"sequence lengths {s_q}/{s_k} are not equal multiples of {SEQ_MULTIPLE}"
    if q.dtype not in (torch.float16, torch.bfloat16) and not interpreting():
        return f"dtype {q.dtype} (the kernels take float16/bfloat16)"
    if len({q.dtype, k.dtype, v.dtype}) != 1 or any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k, v need one dtype and a unit stride in the head dim"
    return None


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        from ._triton.flash_attention import LOG2E, attn_fwd_kernel

        b, h, s_q, d = q.shape
        h_kv, s_k = k.shape[1], k.shape[2]
        out = torch.empty_like(q)  # keeps q's memory order (else contiguous): [S, B, H, D] stays a view
        lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
        grid = lambda meta: (s_q // meta["BLOCK_M"], b * h)  # noqa: E731
        attn_fwd_kernel[grid](q, k, v, out, lse, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v),
                              *_strides(out), h, h // h_kv, s_q, s_k, D=d, CAUSAL=causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from ._triton.flash_attention import (
            LOG2E,
            attn_bwd_delta_kernel,
            attn_bwd_dkdv_kernel,
            attn_bwd_dq_kernel,
        )

        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        b, h, s_q, d = q.shape
        h_kv, s_k = k.shape[1], k.shape[2]
        group, qk_scale = h // h_kv, ctx.scale * LOG2E
        delta = torch.empty_like(lse)
        attn_bwd_delta_kernel[(s_q // SEQ_MULTIPLE, b * h)](out, dout, delta, h, s_q, *_strides(out),
                                                           *_strides(dout), D=d, BLOCK_M=SEQ_MULTIPLE)
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
        attn_bwd_dkdv_kernel[lambda meta: (s_k // meta["BLOCK_N"], b * h_kv)](
            q, k, v, dout, lse, delta, dk, dv, qk_scale, ctx.scale, *common, *_strides(dk), *_strides(dv),
            h, h_kv, group, s_q, s_k, D=d, CAUSAL=ctx.causal)
        attn_bwd_dq_kernel[lambda meta: (s_q // meta["BLOCK_M"], b * h)](
            q, k, v, dout, lse, delta, dq, qk_scale, ctx.scale, *common, *_strides(dq),
            h, group, s_q, s_k, D=d, CAUSAL=ctx.causal)
        return dq, dk, dv, None, None


def flash_attention_triton(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Attention through the Triton kernels; ``RuntimeError`` naming why when they do not apply."""
    reason = unsupported(q, k, v, causal)
    if reason:
        raise RuntimeError(f"flash_attention: {reason}")
    return _FlashAttention.apply(q, k, v, causal, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


def flash_attention(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """:func:`flash_attention_triton` on a Triton device, else :func:`flash_attention_reference`."""
    if use_triton(q, k, v):
        return flash_attention_triton(q, k, v, causal, scale)
    return flash_attention_reference(q, k, v, causal, scale)
