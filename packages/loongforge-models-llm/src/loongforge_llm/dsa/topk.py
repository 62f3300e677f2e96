"""Top-k token selection for DSA: causal, packed-document aware."""

from __future__ import annotations

import torch


def allowed_mask(q_len: int, k_len: int, *, causal: bool = True, segment_ids: torch.Tensor | None = None,
                 query_offset: int = 0, device=None) -> torch.Tensor:
    """Bool ``[B or 1, S, T]``: key ``t`` may be attended by query ``s`` (query ``s`` sits at
    position ``query_offset + s`` of the key sequence).

    ``segment_ids`` ``[B, T]`` (packed documents, one id per token): a query only sees keys of its own
    document.
    """
    q_pos = torch.arange(query_offset, query_offset + q_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    mask = torch.ones(1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        mask = mask & (k_pos[None, None, :] <= q_pos[None, :, None])
    if segment_ids is not None:
        if segment_ids.dim() != 2 or segment_ids.shape[1] != k_len:
            raise ValueError(f"segment_ids must be [B, T={k_len}], got {tuple(segment_ids.shape)}")
        q_seg = segment_ids[:, query_offset:query_offset + q_len]
        mask = mask & (q_seg[:, :, None] == segment_ids[:, None, :])
    return mask


def select_topk(scores: torch.Tensor, topk: int, *, causal: bool = True, segment_ids: torch.Tensor | None = None,
                query_offset: int = 0) -> torch.Tensor:
    """Indices ``[B, S, K]`` (int64, ``K = min(topk, T)``) of the ``topk`` best keys per query.

    Keys in the future or in another document are never chosen; slots beyond a query's number of
    allowed keys hold ``-1``. ``scores`` is ``[B, S, T]`` (e.g. ``LightningIndexer`` output).
    """
    if topk <= 0:
        raise ValueError(f"index_topk must be positive, got {topk}")
    _, s, t = scores.shape
    mask = allowed_mask(s, t, causal=causal, segment_ids=segment_ids, query_offset=query_offset,
                        device=scores.device)
    masked = scores.float().masked_fill(~mask, float("-inf"))
    values, idx = masked.topk(min(topk, t), dim=-1)
    return torch.where(torch.isfinite(values), idx, torch.full_like(idx, -1))


def topk_to_mask(indices: torch.Tensor, k_len: int) -> torch.Tensor:
    """Bool ``[B, S, T]``, True at the selected keys (the ``-1`` slots select nothing)."""
    b, s, _ = indices.shape
    mask = torch.zeros(b, s, k_len + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(indices < 0, k_len, indices), True)
    return mask[..., :k_len]
