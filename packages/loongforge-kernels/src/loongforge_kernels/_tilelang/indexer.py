"""Lightning-indexer forward scores in TileLang (DeepSeek-V3.2 DSA).

One program per (key block, query, batch): ``acc[h, j] = q[s, h] . k[j]`` as one ``[H, D] x [D, BK]``
tensor-core GEMM, then ``relu(acc) * w[s, h]`` and a sum over the H rows. ``w`` arrives with the
softmax scale already folded in (``relu(a * x) = a * relu(x)`` for ``a > 0``). Keys are padded to a
multiple of the block by the caller. One compiled kernel per shape (``functools.lru_cache``).
"""

from __future__ import annotations

from functools import lru_cache

import tilelang
import tilelang.language as T

BLOCK_K = 64


@lru_cache(maxsize=64)
def indexer_kernel(batch: int, seq_q: int, seq_k: int, heads: int, dim: int, dtype: str = "bfloat16",
                   block_k: int = BLOCK_K):
    if seq_k % block_k:
        raise ValueError(f"seq_k={seq_k} must be a multiple of block_k={block_k} (pad the keys)")
    accum = "float32"

    @T.prim_func
    def kernel(
        Q: T.Tensor((batch, seq_q, heads, dim), dtype),
        K: T.Tensor((batch, seq_k, dim), dtype),
        W: T.Tensor((batch, seq_q, heads), accum),
        Out: T.Tensor((batch, seq_q, seq_k), accum),
    ):
        with T.Kernel(seq_k // block_k, seq_q, batch, threads=128) as (bk, sq, b):
            q_s = T.alloc_shared((heads, dim), dtype)
            k_s = T.alloc_shared((block_k, dim), dtype)
            acc = T.alloc_fragment((heads, block_k), accum)
            row = T.alloc_fragment((block_k,), accum)
            T.copy(Q[b, sq, :, :], q_s)
            T.copy(K[b, bk * block_k:(bk + 1) * block_k, :], k_s)
            T.clear(acc)
            T.gemm(q_s, k_s, acc, transpose_B=True)
            for h, j in T.Parallel(heads, block_k):
                acc[h, j] = T.max(acc[h, j], 0.0) * W[b, sq, h]
            T.reduce_sum(acc, row, dim=0)
            T.copy(row, Out[b, sq, bk * block_k:(bk + 1) * block_k])

    return tilelang.compile(kernel, out_idx=[3])
