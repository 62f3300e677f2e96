"""DeepSeek-V3.2 sparse attention (DSA) kernels: lightning-indexer scores, sparse MLA forward.

``lightning_indexer(q, k, weights, scale)``: ``I[b, s, t] = sum_h weights[b, s, h] *
relu(scale * q[b, s, h] . k[b, t])`` in fp32, q ``[B, S, H, D]``, k ``[B, T, D]`` (one key shared
by the indexer heads), weights ``[B, S, H]``. No masking: causal / document masking and top-k are
the caller's (``loongforge_llm.dsa.select_topk``).

Dispatch (``LOONGFORGE_KERNELS_IMPL``, read per call): ``auto`` takes the TileLang kernel when the
tensors are on CUDA, ``q``/``k`` are bf16/fp16 and tilelang imports; ``reference`` always takes
the torch reference; ``tilelang`` forces the kernel (an error where it cannot run).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

ENV_IMPL = "LOONGFORGE_KERNELS_IMPL"


@lru_cache(maxsize=1)
def tilelang_available() -> bool:
    return importlib.util.find_spec("tilelang") is not None


def lightning_indexer_reference(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float()) * scale
    return torch.einsum("bsh,bsht->bst", weights.float(), torch.relu(logits))


def _use_tilelang(q: torch.Tensor, k: torch.Tensor) -> bool:
    chosen = os.environ.get(ENV_IMPL, "auto").strip().lower() or "auto"
    ok = q.is_cuda and k.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
    if chosen == "tilelang":
        if not (ok and tilelang_available()):
            raise RuntimeError(f"{ENV_IMPL}=tilelang needs tilelang and bf16/fp16 CUDA tensors")
        return True
    return chosen == "auto" and ok and tilelang_available()


def lightning_indexer(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward only (the indexer's scores feed a top-k; its training loss uses the reference)."""
    if q.dim() != 4 or k.dim() != 3 or weights.shape != q.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"lightning_indexer: q [B,S,H,D], k [B,T,D], weights [B,S,H]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(weights.shape)}")
    if not _use_tilelang(q, k):
        return lightning_indexer_reference(q, k, weights, scale)
    from ._tilelang.indexer import BLOCK_K, indexer_kernel

    b, s, h, d = q.shape
    t = k.shape[1]
    pad = (-t) % BLOCK_K
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k
    dtype = "bfloat16" if q.dtype == torch.bfloat16 else "float16"
    kernel = indexer_kernel(b, s, t + pad, h, d, dtype)
    out = kernel(q.contiguous(), kp.contiguous(), (weights.float() * scale).contiguous())
    return out[..., :t] if pad else out


def sparse_mla_forward_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                                 dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed sparse MLA: q ``[B, S, H, D]``, kv ``[B, T, D]`` (key = kv, value = ``kv[..., :dv]``),
    indices ``[B, S, K]`` (``-1`` ignored, at least one valid per query) -> ``(out [B, S, H, dv]``
    in q's dtype, natural-log ``lse [B, S, H]`` fp32)."""
    b, s, k = indices.shape
    flat = indices.clamp(min=0).long().reshape(b, s * k, 1).expand(b, s * k, kv.shape[-1])
    sel = torch.gather(kv, 1, flat).view(b, s, k, -1).float()
    logits = torch.einsum("bshd,bskd->bshk", q.float(), sel) * scale
    logits = logits.masked_fill((indices < 0)[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bshk,bskd->bshd", torch.exp(logits - lse[..., None]), sel[..., :dv])
    return out.to(q.dtype), lse


def sparse_mla_forward(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                       dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only; the TileLang kernel needs heads % 64 == 0 (or heads % 16 == 0 and <= 64)."""
    h = q.shape[2]
    block_h = 64 if h % 64 == 0 else h
    if not _use_tilelang(q, kv) or block_h % 16 or block_h > 64:
        return sparse_mla_forward_reference(q, kv, indices, scale, dv)
    from ._tilelang.sparse_mla import sparse_mla_kernel

    b, s, _, d = q.shape
    pad = (-indices.shape[-1]) % 64
    idx = torch.nn.functional.pad(indices, (0, pad), value=-1) if pad else indices
    kernel = sparse_mla_kernel(b, s, kv.shape[1], h, d, dv, idx.shape[-1], float(scale),
                               "bfloat16" if q.dtype == torch.bfloat16 else "float16", block_h)
    return kernel(q.contiguous(), kv.contiguous(), idx.to(torch.int32).contiguous())
