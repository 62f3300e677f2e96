"""Pi0 / Pi0.5 policy network: SigLIP + Gemma prefix, Gemma-style action expert, shared attention.

The network maps an observation (camera images, prompt tokens, and for Pi0 the state vector) plus
noisy actions ``x_t`` and the flow-matching time ``t`` to the predicted velocity ``v_t``; the
noise schedule, the loss and the sampler live in :mod:`loongforge_embodied.flow_matching`.

Sequence layout (big_vision prefix-LM mask): prefix = [image tokens of each camera, prompt
tokens], bidirectional, padded cameras/tokens masked; suffix = Pi0: [state token | action tokens],
Pi0.5: [action tokens]; each ``|`` starts a block that sees everything before it and itself.
The SigLIP blocks are ``loongforge_vlm``'s SigLIP encoder; PaliGemma adds the post-LayerNorm.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from loongforge_vlm.components.siglip import SiglipArgs, SiglipViT
from torch import nn

from loongforge_embodied.pi05.config import PiConfig
from loongforge_embodied.pi05.layers import (
    GemmaLayer,
    GemmaRMSNorm,
    attention_mask,
    joint_layer,
    make_norm,
    rope,
)


class VisionTower(nn.Module):
    def __init__(self, c: PiConfig):
        super().__init__()
        v = c.vision
        self.vit = SiglipViT(SiglipArgs(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                        num_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                                        layer_norm_eps=v.layer_norm_eps))
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.vit(pixels)[0])


def time_features(t: torch.Tensor, dim: int, min_period: float, max_period: float, fp64: bool) -> torch.Tensor:
    """Sine/cosine features of the scalar time ``t`` [B] -> [B, dim] (openpi's periods)."""
    dtype = torch.float64 if fp64 and t.device.type != "mps" else torch.float32
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    x = (1.0 / period * 2 * math.pi)[None, :] * t[:, None].to(dtype)
    return torch.cat([x.sin(), x.cos()], dim=1).to(torch.float32)


class PiModel(nn.Module):
    """Pi0 (``mode='pi0'``) or Pi0.5 (``mode='pi05'``): ``forward(...) -> v_t`` [B, chunk, max_action_dim].

    Training never reads the prefix after the last layer, so ``vlm_norm`` and the last VLM layer's
    ``o_proj``/post-attention norm/MLP get no gradient (they are kept for conversion and inference
    parity; :meth:`unused_in_training` names them so a trainer can freeze them)."""

    def __init__(self, c: PiConfig):
        super().__init__()
        self.cfg = c
        e = c.expert
        self.vision = VisionTower(c)
        self.projector = nn.Linear(c.vision.hidden_size, c.vlm.width)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.vlm.width)
        self.vlm_layers = nn.ModuleList(GemmaLayer(c.vlm, c.rms_norm_eps) for _ in range(c.vlm.depth))
        self.vlm_norm = GemmaRMSNorm(c.vlm.width, c.rms_norm_eps)
        cond = e.width if c.mode == "pi05" else None
        self.expert_layers = nn.ModuleList(GemmaLayer(e, c.rms_norm_eps, cond) for _ in range(e.depth))
        self.expert_norm = make_norm(e.width, c.rms_norm_eps, cond)
        self.action_in_proj = nn.Linear(c.max_action_dim, e.width)
        self.action_out_proj = nn.Linear(e.width, c.max_action_dim)
        if c.mode == "pi0":
            self.state_proj = nn.Linear(c.max_state_dim, e.width)
            self.action_time_mlp_in = nn.Linear(2 * e.width, e.width)
            self.action_time_mlp_out = nn.Linear(e.width, e.width)
        else:
            self.time_mlp_in = nn.Linear(e.width, e.width)
            self.time_mlp_out = nn.Linear(e.width, e.width)

    def unused_in_training(self) -> list[str]:
        i = len(self.vlm_layers) - 1
        return [n for n, _ in self.named_parameters()
                if n.startswith("vlm_norm.") or re.match(rf"vlm_layers\.{i}\.(self_attn\.o_proj|post_attention_layernorm|mlp)\.", n)]

    # -- embeddings ---------------------------------------------------------------------------
    def embed_prefix(self, images, image_masks, tokens, token_masks):
        """images [B, ncam, C, H, W], image_masks [B, ncam], tokens/token_masks [B, L]
        -> (embeddings [B, P, width], pad mask [B, P])."""
        b, ncam = images.shape[:2]
        feats = self.projector(self.vision(images.flatten(0, 1)))
        n = feats.shape[1]
        feats = feats.view(b, ncam * n, -1)
        img_pad = image_masks.bool()[:, :, None].expand(b, ncam, n).reshape(b, ncam * n)
        w = self.embed_tokens.weight
        lang = self.embed_tokens(tokens) * torch.tensor(self.cfg.vlm.width ** 0.5, dtype=w.dtype)
        return torch.cat([feats.to(lang.dtype), lang], 1), torch.cat([img_pad, token_masks.bool()], 1)

    def embed_suffix(self, x_t, t, state=None):
        """-> (embeddings [B, S, width_e], block starts [S], adaRMS condition or None)."""
        c = self.cfg
        tf = time_features(t, c.expert.width, c.min_period, c.max_period, c.time_features_fp64)
        act = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        blocks = torch.zeros(c.chunk_size, dtype=torch.long, device=x_t.device)
        blocks[0] = 1
        if c.mode == "pi05":
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(tf.to(act.dtype)))))
            return act, blocks, cond
        if state is None:
            raise ValueError("Pi0 needs the robot state (a continuous state token)")
        tfe = tf.to(act.dtype)[:, None, :].expand_as(act)
        act = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([act, tfe], 2))))
        st = self.state_proj(state.to(act.dtype))[:, None]
        return torch.cat([st, act], 1), torch.cat([blocks.new_ones(1), blocks]), None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, images, image_masks, tokens, token_masks, x_t, t, state=None) -> torch.Tensor:
        """Predicted velocity [B, chunk, max_action_dim] (fp32) for noisy actions ``x_t`` at time ``t``."""
        prefix, ppad = self.embed_prefix(images, image_masks, tokens, token_masks)
        suffix, sblocks, cond = self.embed_suffix(x_t, t, state)
        b = prefix.shape[0]
        pad = torch.cat([ppad, ppad.new_ones(b, suffix.shape[1])], 1)
        blocks = torch.cat([sblocks.new_zeros(prefix.shape[1]), sblocks])[None].expand(b, -1)
        mask = attention_mask(pad, blocks)
        cos, sin = rope(self.cfg.vlm.head_dim, self.cfg.rope_theta, torch.cumsum(pad.long(), 1) - 1)
        xs = [prefix, suffix.to(prefix.dtype)]
        last = len(self.vlm_layers) - 1
        for i, (lv, le) in enumerate(zip(self.vlm_layers, self.expert_layers, strict=True)):
            xs, _ = joint_layer([lv, le], xs, [None, cond], cos, sin, mask, keep=(i < last, True))
        out = self.expert_norm(xs[1], cond)[0]
        return self.action_out_proj(out[:, -self.cfg.chunk_size:]).float()

    # -- inference: prefix once, then the expert against the cached keys/values -----------------
    @torch.no_grad()
    def prefix_cache(self, images, image_masks, tokens, token_masks):
        """Run the prefix alone; -> (per-layer (k, v), prefix pad mask)."""
        prefix, ppad = self.embed_prefix(images, image_masks, tokens, token_masks)
        mask = attention_mask(ppad, torch.zeros_like(ppad, dtype=torch.long))
        cos, sin = rope(self.cfg.vlm.head_dim, self.cfg.rope_theta, torch.cumsum(ppad.long(), 1) - 1)
        x, cache = [prefix], []
        for lv in self.vlm_layers:
            x, kv = joint_layer([lv], x, [None], cos, sin, mask)
            cache.append(kv)
        return cache, ppad

    @torch.no_grad()
    def velocity_cached(self, cache, ppad, x_t, t, state=None) -> torch.Tensor:
        suffix, sblocks, cond = self.embed_suffix(x_t, t, state)
        b, s = suffix.shape[:2]
        cum = torch.cumsum(sblocks, 0)
        own = (cum[None, :] <= cum[:, None])[None].expand(b, s, s)
        ok = torch.cat([ppad[:, None, :].expand(b, s, ppad.shape[1]), own], 2)
        mask = torch.where(ok, 0.0, torch.finfo(torch.float32).min)[:, None]
        pos = ppad.long().sum(1, keepdim=True) + torch.arange(s, device=x_t.device)[None]
        cos, sin = rope(self.cfg.vlm.head_dim, self.cfg.rope_theta, pos)
        x = [suffix.to(cache[0][0].dtype)]
        for le, kv in zip(self.expert_layers, cache, strict=True):
            x, _ = joint_layer([le], x, [cond], cos, sin, mask, cache=kv)
        out = self.expert_norm(x[0], cond)[0]
        return self.action_out_proj(out[:, -self.cfg.chunk_size:]).float()
