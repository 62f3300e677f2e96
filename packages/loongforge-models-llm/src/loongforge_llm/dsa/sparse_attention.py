"""Attention of each query over its selected keys only (DSA), pure torch, chunked over queries."""

from __future__ import annotations

import torch


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x ``[B, T, Hk, D]``, idx ``[B, C, K]`` (>= 0) -> ``[B, C, K, Hk, D]``."""
    b, c, k = idx.shape
    flat = idx.reshape(b, c * k)
    out = torch.gather(x, 1, flat[:, :, None, None].expand(b, c * k, x.shape[2], x.shape[3]))
    return out.view(b, c, k, x.shape[2], x.shape[3])


def sparse_mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk_indices: torch.Tensor,
                         scale: float, *, chunk_size: int | None = None, return_lse: bool = False):
    """``out[b, s, h] = softmax_t(scale * q[b, s, h] . k[b, t, h'])  v[b, t, h']`` over ``t`` in
    ``topk_indices[b, s]`` (``-1`` slots ignored).

    q ``[B, S, H, Dqk]``; k ``[B, T, Hk, Dqk]``, v ``[B, T, Hk, Dv]`` with ``Hk == H`` (expanded MLA) or
    ``Hk == 1`` (absorbed MLA: the shared latent+rope key, the latent as value). Each query must
    have at least one valid index (its own token always is, under ``select_topk``).
    Returns ``[B, S, H, Dv]`` (and the log-sum-exp ``[B, S, H]`` in fp32 if ``return_lse``).
    Computation in fp32; memory ``O(chunk * K * Hk * D)`` for the gathered keys.
    """
    b, s, h, _ = q.shape
    hk = k.shape[2]
    if hk not in (1, h) or v.shape[2] != hk:
        raise ValueError(f"k/v heads must be 1 or {h}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    chunk = chunk_size or s
    outs, lses = [], []
    for start in range(0, s, chunk):
        idx = topk_indices[:, start:start + chunk]
        valid = idx >= 0
        safe = idx.clamp(min=0)
        ks, vs = _gather(k, safe).float(), _gather(v, safe).float()  # [B, C, K, Hk, D]
        qc = q[:, start:start + chunk].float()
        if hk == 1:
            logits = torch.einsum("bchd,bckd->bchk", qc, ks[:, :, :, 0])
        else:
            logits = torch.einsum("bchd,bckhd->bchk", qc, ks)
        logits = (logits * scale).masked_fill(~valid[:, :, None, :], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - lse[..., None])
        if hk == 1:
            out = torch.einsum("bchk,bckd->bchd", p, vs[:, :, :, 0])
        else:
            out = torch.einsum("bchk,bckhd->bchd", p, vs)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    out = torch.cat(outs, dim=1)
    return (out, torch.cat(lses, dim=1)) if return_lse else out


def sparse_attention_probs(q: torch.Tensor, k: torch.Tensor, topk_indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head attention probabilities over the selected keys, ``[B, S, H, K]`` fp32 (``0`` at
    the ``-1`` slots): the main attention's distribution that the sparse-stage indexer loss targets."""
    valid = topk_indices >= 0
    acc = torch.promote_types(q.dtype, torch.float32)
    q, ks = q.to(acc), _gather(k, topk_indices.clamp(min=0)).to(acc)
    if k.shape[2] == 1:
        logits = torch.einsum("bshd,bskd->bshk", q, ks[:, :, :, 0])
    else:
        logits = torch.einsum("bshd,bskhd->bshk", q, ks)
    return torch.softmax((logits * scale).masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1)
