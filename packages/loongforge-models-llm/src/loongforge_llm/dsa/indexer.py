"""DeepSeek-V3.2 lightning indexer (DSA), pure torch.

Math (read from transformers' ``DeepseekV32Indexer``; the same in DeepSeek's inference code):

    q[s, h]   = wq_b(q_lora[s])                      # q_lora = q_a_layernorm(q_a_proj(x)), the MLA query latent
    k[t]      = LayerNorm(wk(x[t]))                  # ONE key per token, shared by all indexer heads
    RoPE      on the first ``rope_dim`` dims of q and k, NON-interleaved (rotate-half), unlike MLA's
    w[s, h]   = weights_proj(x[s]) * n_heads**-0.5
    I[s, t]   = sum_h w[s, h] * relu(scale * q[s, h] . k[t]),   scale = head_dim**-0.5

The Hadamard rotation of DeepSeek's inference code (``rotate_activation`` on q and k) is skipped:
an orthonormal rotation keeps every dot product (Hq . Hk = q . k), it only spreads outliers before
their FP8 quantisation, and we score in bf16/fp32. transformers skips it for the same reason.
An FP8 indexer would have to add it back.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[..., dim]`` laid out as ``cat(freqs, freqs)`` (HF's rotary embedding)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; ``x`` is ``[B, S, (H,) D]``, ``cos``/``sin`` are ``[B, S, D]``."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek MLA RoPE: pairs ``(x0, x1), (x2, x3)...`` rotated, output de-interleaved
    (``[evens', odds']``, as HF's ``apply_rotary_pos_emb_interleave``). ``cos``/``sin`` ``[B, S, D]``."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def lightning_indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """``I[b, s, t] = sum_h weights[b, s, h] * relu(scale * q[b, s, h] . k[b, t])`` in fp32.

    q ``[B, S, H, D]``, k ``[B, T, D]``, weights ``[B, S, H]`` -> ``[B, S, T]`` (no masking).
    """
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float()) * scale
    return torch.einsum("bsh,bsht->bst", weights.float(), torch.relu(logits))


def lightning_indexer_scores_at(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float,
                                indices: torch.Tensor) -> torch.Tensor:
    """The index scores at the selected keys only, ``[B, S, K]`` fp32 (``indices`` ``[B, S, K]``,
    ``-1`` slots give the score of key 0; mask them). Memory ``O(S * K * D)`` instead of ``O(S * T)``:
    what the sparse-stage indexer loss needs, with gradients to ``q``, ``k`` and ``weights``."""
    b, s, kk = indices.shape
    flat = indices.clamp(min=0).reshape(b, s * kk, 1).expand(b, s * kk, k.shape[-1])
    ks = torch.gather(k, 1, flat).view(b, s, kk, k.shape[-1]).float()
    logits = torch.einsum("bshd,bskd->bshk", q.float(), ks) * scale
    return torch.einsum("bsh,bshk->bsk", weights.float(), torch.relu(logits))


class LightningIndexer(nn.Module):
    """The DSA indexer of one layer. Parameter names match transformers' ``DeepseekV32Indexer``
    (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``) so its state dict loads as is."""

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int):
        super().__init__()
        if not 0 < rope_dim <= head_dim or rope_dim % 2:
            raise ValueError(f"index rope_dim={rope_dim} must be even and in (0, index_head_dim={head_dim}]")
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        self.softmax_scale = head_dim**-0.5

    def project(self, hidden: torch.Tensor, q_lora: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> ``(q [B, S, H, D], k [B, S, D], weights [B, S, H])``, RoPE applied (``cos``/``sin``
        ``[B, S, rope_dim]``, rotate-half layout)."""
        b, s, _ = hidden.shape
        q = self.wq_b(q_lora).view(b, s, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(hidden))
        r = self.rope_dim
        q = torch.cat((rope_half(q[..., :r], cos, sin), q[..., r:]), dim=-1)
        k = torch.cat((rope_half(k[..., :r], cos, sin), k[..., r:]), dim=-1)
        weights = self.weights_proj(hidden) * self.n_heads**-0.5
        return q, k, weights

    def forward(self, hidden: torch.Tensor, q_lora: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                detach_input: bool = False) -> torch.Tensor:
        """Index scores ``[B, S, T]`` (fp32, unmasked: mask and select with ``select_topk``).

        ``detach_input=True`` is the sparse training stage: the indexer learns only from its own
        loss and sends no gradient into the main model.
        """
        if detach_input:
            hidden, q_lora = hidden.detach(), q_lora.detach()
        q, k, w = self.project(hidden, q_lora, cos, sin)
        return lightning_indexer_scores(q, k, w, self.softmax_scale)


def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float, topk: int, *,
                 causal: bool = True, segment_ids: torch.Tensor | None = None,
                 chunk_size: int | None = None) -> torch.Tensor:
    """``select_topk(lightning_indexer_scores(...))`` over query chunks, so the ``[S, T]`` score
    matrix is never whole (memory ``O(chunk * T)``). Returns ``[B, S, K]`` indices, ``-1`` padded."""
    from .topk import select_topk

    s = q.shape[1]
    chunk = chunk_size or s
    parts = []
    for start in range(0, s, chunk):
        sc = lightning_indexer_scores(q[:, start:start + chunk], k, weights[:, start:start + chunk], scale)
        parts.append(select_topk(sc, topk, causal=causal, segment_ids=segment_ids, query_offset=start))
    return torch.cat(parts, dim=1)
