"""Flash attention (forward, backward) for causal or full self-attention with grouped KV heads.

Why our own: at head dim 64 (Llama-3.2-1B, 32 heads) torch's SDPA kernels run far below the
H100's peak (cuDNN ~200 TFLOP/s forward, flash-2 slower still); the CUDA backend times this
kernel against them per shape and keeps the fastest.

Layout: ``[B, H, S, D]`` views with any strides whose last one is 1 (megatron's ``[S, B, H, D]``
activations permuted, no copies); ``K``/``V`` have ``H_kv`` heads, ``H % H_kv == 0``. The
forward keeps the log-sum-exp per row (base 2, scale folded in); the backward recomputes the
probabilities: one kernel for dK/dV (summing over the query heads of the group, no atomics) and
one for dQ. Causal blocks are split into unmasked ones and the diagonal ones that need the mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._dispatch import interpreting

LOG2E = 1.4426950408889634


def _configs(gpu: tuple, interpreted: tuple) -> list:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates; one small config in the CPU interpreter
    (no timing there) whose blocks still split the causal diagonal."""
    rows = interpreted if interpreting() else gpu
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


# forward and dQ step over key blocks inside a query block (BLOCK_M % BLOCK_N == 0); dK/dV the other way
_FWD = _configs(((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)), ((64, 32, 4, 1),))
_DKDV = _configs(((32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)), ((32, 64, 4, 1),))
_DQ = _configs(((128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)), ((64, 32, 4, 1),))


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, start, stop, offs_m, offs_d, qk_scale,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + offs_n[None, :] * stride_ks + offs_d[:, None])
        s = tl.dot(q, k) * qk_scale
        if MASKED:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_FWD, key=["S_Q", "S_K", "D", "CAUSAL"])
@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE, qk_scale,
                    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                    H, GROUP, S_Q, S_K,
                    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :])
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if CAUSAL:
        diag = pid_m * BLOCK_M
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, Kb, Vb, sks, svs, 0, diag, offs_m, offs_d, qk_scale,
                                   False, BLOCK_N)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, Kb, Vb, sks, svs, diag, diag + BLOCK_M, offs_m, offs_d,
                                   qk_scale, True, BLOCK_N)
    else:
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, Kb, Vb, sks, svs, 0, S_K, offs_m, offs_d, qk_scale,
                                   False, BLOCK_N)
    acc = acc / l_i[:, None]
    tl.store(LSE + bh * S_Q + offs_m, m_i + tl.math.log2(l_i))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def attn_bwd_delta_kernel(O, DO, DELTA, H, S, sob, soh, sos, sdb, sdh, sds,
                          D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): the softmax backward's per-row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :]).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :]).to(tl.float32)
    tl.store(DELTA + bh * S + offs_m, tl.sum(o * do, 1))


@triton.jit
def _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_ds, start, stop, offs_n, offs_d, qk_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :])
        lse = tl.load(LSE + offs_m)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_ds + offs_d[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        delta = tl.load(DELTA + offs_m)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.autotune(configs=_DKDV, key=["S_Q", "S_K", "D", "CAUSAL"])
@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
                         sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                         sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                         H, H_KV, GROUP, S_Q, S_K,
                         D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // H_KV, bhk % H_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :])
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :])
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        LSEh = LSE + (b * H + h) * S_Q
        DELTAh = DELTA + (b * H + h) * S_Q
        if CAUSAL:
            diag = pid_n * BLOCK_N
            dk, dv = _dkdv_block(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqs, sds, diag, diag + BLOCK_N, offs_n,
                                 offs_d, qk_scale, True, BLOCK_M)
            dk, dv = _dkdv_block(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqs, sds, diag + BLOCK_N, S_Q, offs_n,
                                 offs_d, qk_scale, False, BLOCK_M)
        else:
            dk, dv = _dkdv_block(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqs, sds, 0, S_Q, offs_n, offs_d,
                                 qk_scale, False, BLOCK_M)
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_block(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, start, stop, offs_m, offs_d, qk_scale,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.autotune(configs=_DQ, key=["S_Q", "S_K", "D", "CAUSAL"])
@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdqb, sdqh, sdqs,
                       H, GROUP, S_Q, S_K,
                       D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :])
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :])
    lse = tl.load(LSE + bh * S_Q + offs_m)
    delta = tl.load(DELTA + bh * S_Q + offs_m)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if CAUSAL:
        diag = pid_m * BLOCK_M
        dq = _dq_block(dq, q, do, lse, delta, Kb, Vb, sks, svs, 0, diag, offs_m, offs_d, qk_scale, False, BLOCK_N)
        dq = _dq_block(dq, q, do, lse, delta, Kb, Vb, sks, svs, diag, diag + BLOCK_M, offs_m, offs_d, qk_scale,
                       True, BLOCK_N)
    else:
        dq = _dq_block(dq, q, do, lse, delta, Kb, Vb, sks, svs, 0, S_K, offs_m, offs_d, qk_scale, False, BLOCK_N)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty))
