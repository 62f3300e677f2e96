"""Sparse MLA forward in TileLang (DeepSeek-V3.2 DSA, absorbed form), forward only.

One program per (query, block of ``block_h`` heads, batch). The shared key of token t is
``kv[t] = [latent (dv) | rope (dim - dv)]`` and its value is the latent. For each block of
``block_i`` selected indices the rows are gathered into shared memory (``-1`` -> zeros, masked),
scores = ``q_lat . lat + q_rope . rope`` (two tensor-core GEMMs), online softmax in base 2 with
the scale folded in, ``acc += P @ lat``. Requires a valid index in the first block (``select_topk``
puts the valid indices first: its top-k is sorted). One compiled kernel per shape.
"""

from __future__ import annotations

from functools import lru_cache

import tilelang
import tilelang.language as T

LOG2E = 1.4426950408889634


@lru_cache(maxsize=64)
def sparse_mla_kernel(batch: int, seq_q: int, seq_k: int, heads: int, dim: int, dv: int, topk: int, scale: float,
                      dtype: str = "bfloat16", block_h: int = 64, block_i: int = 64):
    if heads % block_h or topk % block_i:
        raise ValueError(f"heads={heads} % block_h={block_h} and topk={topk} % block_i={block_i} must be 0")
    accum, dr = "float32", dim - dv
    sm = scale * LOG2E

    @T.prim_func
    def kernel(
        Q: T.Tensor((batch, seq_q, heads, dim), dtype),
        KV: T.Tensor((batch, seq_k, dim), dtype),
        Idx: T.Tensor((batch, seq_q, topk), "int32"),
        Out: T.Tensor((batch, seq_q, heads, dv), dtype),
        Lse: T.Tensor((batch, seq_q, heads), accum),
    ):
        with T.Kernel(seq_q, heads // block_h, batch, threads=256) as (sq, hb, b):
            q_lat = T.alloc_shared((block_h, dv), dtype)
            q_rope = T.alloc_shared((block_h, dr), dtype)
            lat_s = T.alloc_shared((block_i, dv), dtype)
            rope_s = T.alloc_shared((block_i, dr), dtype)
            p_s = T.alloc_shared((block_h, block_i), dtype)
            acc_s = T.alloc_fragment((block_h, block_i), accum)
            acc_o = T.alloc_fragment((block_h, dv), accum)
            m = T.alloc_fragment((block_h,), accum)
            m_prev = T.alloc_fragment((block_h,), accum)
            alpha = T.alloc_fragment((block_h,), accum)
            l_sum = T.alloc_fragment((block_h,), accum)
            row = T.alloc_fragment((block_h,), accum)
            h0 = hb * block_h
            zero = T.cast(0, dtype)
            T.copy(Q[b, sq, h0:h0 + block_h, 0:dv], q_lat)
            T.copy(Q[b, sq, h0:h0 + block_h, dv:dim], q_rope)
            T.fill(acc_o, 0)
            T.fill(l_sum, 0)
            T.fill(m, -T.infinity(accum))
            for it in T.serial(topk // block_i):
                i0 = it * block_i
                for i, d in T.Parallel(block_i, dv):
                    lat_s[i, d] = T.if_then_else(Idx[b, sq, i0 + i] >= 0, KV[b, T.max(Idx[b, sq, i0 + i], 0), d], zero)
                for i, d in T.Parallel(block_i, dr):
                    rope_s[i, d] = T.if_then_else(Idx[b, sq, i0 + i] >= 0,
                                                  KV[b, T.max(Idx[b, sq, i0 + i], 0), dv + d], zero)
                T.clear(acc_s)
                T.gemm(q_lat, lat_s, acc_s, transpose_B=True)
                T.gemm(q_rope, rope_s, acc_s, transpose_B=True)
                for h, i in T.Parallel(block_h, block_i):
                    acc_s[h, i] = T.if_then_else(Idx[b, sq, i0 + i] >= 0, acc_s[h, i] * sm, -T.infinity(accum))
                T.copy(m, m_prev)
                T.reduce_max(acc_s, m, dim=1, clear=False)
                for h in T.Parallel(block_h):
                    alpha[h] = T.exp2(m_prev[h] - m[h])
                for h, i in T.Parallel(block_h, block_i):
                    acc_s[h, i] = T.exp2(acc_s[h, i] - m[h])
                T.reduce_sum(acc_s, row, dim=1)
                for h in T.Parallel(block_h):
                    l_sum[h] = l_sum[h] * alpha[h] + row[h]
                for h, d in T.Parallel(block_h, dv):
                    acc_o[h, d] = acc_o[h, d] * alpha[h]
                T.copy(acc_s, p_s)
                T.gemm(p_s, lat_s, acc_o)
            for h, d in T.Parallel(block_h, dv):
                acc_o[h, d] = acc_o[h, d] / l_sum[h]
            for h in T.Parallel(block_h):
                row[h] = (T.log2(l_sum[h]) + m[h]) / LOG2E
            T.copy(acc_o, Out[b, sq, h0:h0 + block_h, :])
            T.copy(row, Lse[b, sq, h0:h0 + block_h])

    return tilelang.compile(kernel, out_idx=[3, 4])
