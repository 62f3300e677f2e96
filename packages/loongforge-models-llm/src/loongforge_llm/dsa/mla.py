"""A small DeepSeek-V3.2 attention layer (MLA + DSA) built from the DSA pieces.

It is the reference the pieces are checked against transformers with, and the unfused torch path
of ``bench/dsa_step.py``; the production MLA module (``deepseek*/``) calls the same functions:
``LightningIndexer`` -> ``indexer_topk``/``select_topk`` -> ``sparse_mla_attention``. Parameter
names match transformers' ``DeepseekV32Attention`` so its state dict loads as is. Default RoPE
only (no YaRN mscale); no KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .indexer import LightningIndexer, indexer_topk, lightning_indexer_scores, rope_cos_sin, rope_interleaved
from .sparse_attention import sparse_mla_attention
from .topk import select_topk


@dataclass
class MLADims:
    hidden_size: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, config) -> MLADims:
        """From a transformers ``DeepseekV32Config`` (default RoPE only)."""
        rope = config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.rope_type={rope.get('rope_type')!r}: only 'default' is supported here")
        return cls(config.hidden_size, config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank,
                   config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.index_n_heads,
                   config.index_head_dim, config.index_topk, rope.get("rope_theta", 10000.0), config.rms_norm_eps)


class DSAMLAttention(nn.Module):
    def __init__(self, d: MLADims):
        super().__init__()
        self.d = d
        h, qk = d.num_heads, d.qk_nope_head_dim + d.qk_rope_head_dim
        self.q_a_proj = nn.Linear(d.hidden_size, d.q_lora_rank, bias=False)
        self.q_a_layernorm = nn.RMSNorm(d.q_lora_rank, eps=d.rms_norm_eps)
        self.q_b_proj = nn.Linear(d.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d.hidden_size, d.kv_lora_rank + d.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(d.kv_lora_rank, eps=d.rms_norm_eps)
        self.kv_b_proj = nn.Linear(d.kv_lora_rank, h * (d.qk_nope_head_dim + d.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * d.v_head_dim, d.hidden_size, bias=False)
        self.indexer = LightningIndexer(d.hidden_size, d.q_lora_rank, d.index_n_heads, d.index_head_dim,
                                        d.qk_rope_head_dim)
        self.scale = qk**-0.5

    def qkv(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, absorbed: bool):
        """-> ``(q_lora, q, k, v)``: expanded (``k``/``v`` per head) or absorbed (one shared
        ``[latent | rope]`` key, the latent as value; ``v_head_dim`` restored by ``out_proj``)."""
        d, (b, s, _) = self.d, hidden.shape
        q_lora = self.q_a_layernorm(self.q_a_proj(hidden))
        q = self.q_b_proj(q_lora).view(b, s, d.num_heads, -1)
        q_nope, q_rope = q.split([d.qk_nope_head_dim, d.qk_rope_head_dim], dim=-1)
        q_rope = rope_interleaved(q_rope, cos, sin)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([d.kv_lora_rank, d.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = rope_interleaved(k_rope, cos, sin).unsqueeze(2)  # [B, T, 1, R]
        if absorbed:
            w_uk = self._kv_b()[:, : d.qk_nope_head_dim]  # [H, nope, L]
            q_lat = torch.einsum("bshn,hnl->bshl", q_nope, w_uk)
            return q_lora, torch.cat((q_lat, q_rope), -1), torch.cat((latent.unsqueeze(2), k_rope), -1), latent.unsqueeze(2)
        kv = self.kv_b_proj(latent).view(b, s, d.num_heads, -1)
        k_nope, v = kv.split([d.qk_nope_head_dim, d.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, d.num_heads, -1)), dim=-1)
        return q_lora, torch.cat((q_nope, q_rope), -1), k, v

    def _kv_b(self) -> torch.Tensor:
        d = self.d
        return self.kv_b_proj.weight.view(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)

    def out_proj(self, out: torch.Tensor, absorbed: bool) -> torch.Tensor:
        if absorbed:  # [B, S, H, L] -> [B, S, H, v]
            out = torch.einsum("bshl,hvl->bshv", out, self._kv_b()[:, self.d.qk_nope_head_dim:])
        return self.o_proj(out.flatten(2))

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, *, absorbed: bool = False,
                chunk_size: int | None = None, detach_indexer_input: bool = False, dense: bool = False,
                return_aux: bool = False):
        """``hidden [B, S, hidden]`` -> ``[B, S, hidden]`` (and an aux dict for the indexer losses).

        ``positions`` default ``arange(S)`` (restart them per document for packed input);
        ``segment_ids [B, S]`` keeps top-k inside each document. With ``chunk_size`` the index
        scores are computed per query chunk and not returned. ``dense=True`` (the indexer's dense
        warm-up) attends to every allowed key; the indexer still runs, for its loss.
        """
        b, s, _ = hidden.shape
        if positions is None:
            positions = torch.arange(s, device=hidden.device).expand(b, s)
        cos, sin = rope_cos_sin(positions, self.d.qk_rope_head_dim, self.d.rope_theta)
        q_lora, q, k, v = self.qkv(hidden, cos, sin, absorbed)
        ih, il = (hidden.detach(), q_lora.detach()) if detach_indexer_input else (hidden, q_lora)
        iq, ik, iw = self.indexer.project(ih, il, cos, sin)
        scores, topk = None, (s if dense else self.d.index_topk)
        if chunk_size is None:
            scores = lightning_indexer_scores(iq, ik, iw, self.indexer.softmax_scale)
            idx = select_topk(scores, topk, segment_ids=segment_ids)
        else:
            with torch.no_grad():
                idx = indexer_topk(iq, ik, iw, self.indexer.softmax_scale, topk,
                                   segment_ids=segment_ids, chunk_size=chunk_size)
        out = self.out_proj(sparse_mla_attention(q, k, v, idx, self.scale, chunk_size=chunk_size), absorbed)
        if not return_aux:
            return out
        return out, {"index_scores": scores, "topk_indices": idx, "query": q, "key": k, "scale": self.scale,
                     "indexer": (iq, ik, iw, self.indexer.softmax_scale)}
