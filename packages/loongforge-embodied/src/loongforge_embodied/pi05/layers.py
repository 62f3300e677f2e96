"""Gemma decoder layers whose attention is shared by several token streams (openpi's "mixture of
transformers": the VLM prefix and the action-expert suffix each use their own weights for the
norms, projections and MLP, and attend jointly over the concatenated keys/values).

* :class:`GemmaRMSNorm`: ``x / rms(x) * (1 + w)`` in fp32.
* :class:`AdaRMSNorm`: Pi0.5's adaptive norm: a linear map of the condition (the flow-matching
  time embedding) gives ``scale, shift, gate``; the norm returns ``x / rms(x) * (1 + scale) + shift``
  and the gate that multiplies the residual branch it feeds.
* :func:`joint_layer`: one layer over a list of streams (``None`` for a stream that is absent,
  e.g. the prefix when its keys/values come from a cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loongforge_embodied.pi05.config import GemmaSize


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        return (rms(x, self.eps) * (1.0 + self.weight.float())).type_as(x), None


class AdaRMSNorm(nn.Module):
    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        if cond is None:
            raise ValueError("AdaRMSNorm needs the time condition (Pi0.5 action expert)")
        scale, shift, gate = self.dense(cond).unsqueeze(1).chunk(3, dim=-1)
        out = rms(x, self.eps) * (1 + scale.float()) + shift.float()
        return out.to(x.dtype), gate.to(x.dtype)


def make_norm(dim: int, eps: float, cond_dim: int | None) -> nn.Module:
    return AdaRMSNorm(dim, cond_dim, eps) if cond_dim else GemmaRMSNorm(dim, eps)


class Attention(nn.Module):
    def __init__(self, s: GemmaSize):
        super().__init__()
        self.q_proj = nn.Linear(s.width, s.num_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.width, s.num_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.width, s.num_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.width, bias=False)


class MLP(nn.Module):
    def __init__(self, s: GemmaSize):
        super().__init__()
        self.gate_proj = nn.Linear(s.width, s.mlp_dim, bias=False)
        self.up_proj = nn.Linear(s.width, s.mlp_dim, bias=False)
        self.down_proj = nn.Linear(s.mlp_dim, s.width, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    """The weights of one stream in one layer (HF Gemma names)."""

    def __init__(self, s: GemmaSize, eps: float, cond_dim: int | None = None):
        super().__init__()
        self.size = s
        self.input_layernorm = make_norm(s.width, eps, cond_dim)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = make_norm(s.width, eps, cond_dim)
        self.mlp = MLP(s)


def rope(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, head_dim] for integer ``positions`` [B, T] (Gemma's rotary embedding, fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def joint_layer(layers: list[GemmaLayer], xs: list, conds: list, cos, sin, mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, keep: tuple[bool, ...] | None = None):
    """One shared-attention layer. ``xs[i]`` [B, T_i, width_i] or None; ``mask`` [B, 1, Tq, Tk]
    additive (0 / large negative) over the present queries and all keys (cache first); ``keep[i]``
    False skips stream i's output (the prefix after the last layer is never read).
    Returns (outputs, (k, v) of the present streams before the cache is prepended)."""
    s = layers[0].size
    qs, ks, vs, gates = [], [], [], []
    for layer, x, c in zip(layers, xs, conds, strict=True):
        if x is None:
            gates.append(None)
            continue
        h, g = layer.input_layernorm(x, c)
        gates.append(g)
        b, t = h.shape[:2]
        qs.append(layer.self_attn.q_proj(h).view(b, t, -1, s.head_dim).transpose(1, 2))
        ks.append(layer.self_attn.k_proj(h).view(b, t, -1, s.head_dim).transpose(1, 2))
        vs.append(layer.self_attn.v_proj(h).view(b, t, -1, s.head_dim).transpose(1, 2))
    q, k, v = torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    new_kv = (k, v)
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    rep = s.num_heads // s.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=s.head_dim ** -0.5)
    o = o.transpose(1, 2).flatten(2)
    outs, start = [], 0
    for j, (layer, x, c, g) in enumerate(zip(layers, xs, conds, gates, strict=True)):
        if x is None or (keep is not None and not keep[j]):
            outs.append(None)
            start += 0 if x is None else x.shape[1]
            continue
        end = start + x.shape[1]
        y = layer.self_attn.o_proj(o[:, start:end].to(layer.self_attn.o_proj.weight.dtype))
        x = x + (y if g is None else y * g)
        h, g2 = layer.post_attention_layernorm(x, c)
        y = layer.mlp(h)
        outs.append(x + (y if g2 is None else y * g2))
        start = end
    return outs, new_kv


def attention_mask(pad: torch.Tensor, blocks: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """big_vision's prefix-LM mask: token q sees valid token k when ``cumsum(blocks)[k] <=
    cumsum(blocks)[q]`` (``blocks`` is 1 where a new causal block starts). Additive [B, 1, T, T]."""
    cum = torch.cumsum(blocks.long(), dim=1)
    ok = (cum[:, None, :] <= cum[:, :, None]) & pad[:, None, :] & pad[:, :, None]
    return torch.where(ok, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]
