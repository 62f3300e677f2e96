"""Qwen2.5-VL vision transformer: 3D-conv patch embedding, 2D RoPE, window attention, RMSNorm, SwiGLU.

Inputs follow the Qwen2.5-VL preprocessing (``loongforge_vlm.data.qwen2_5_image``): ``pixels``
[n_patches, C * T * P * P] of all images concatenated, with patches of each image ordered in
``spatial_merge_size`` x ``spatial_merge_size`` blocks (block-major), and ``grid_thw`` [n_images, 3].

Window attention: the blocks named in ``fullatt_block_indexes`` attend over each whole image; the
others within windows of ``window_size`` pixels. Tokens are reordered once so that every window is
contiguous (``window_order``); the output is returned in that order and the projector undoes it
after merging (``Qwen2_5Merger``), since merging groups are never split by a window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loongforge_vlm.components.common import RMSNorm, component_args


@dataclass(frozen=True)
class ViTArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    freeze: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def vision_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch [n, 2], in the block-major order of the preprocessing."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        pos = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], -1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Permutation of the merge groups that makes each attention window contiguous, and the
    window lengths in patches. A window is ``window`` merged tokens on a side (edge windows smaller)."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    block = index[ti, r:r + window, c:c + window].flatten()
                    order.append(block + offset)
                    lengths.append(block.numel() * merge * merge)
        offset += t * gh * gw
    return torch.cat(order), lengths


def image_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches per attention span of full-attention blocks (each frame of each image)."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, a: ViTArgs):
        super().__init__()
        self.num_heads, self.head_dim = a.num_heads, a.head_dim
        self.qkv = nn.Linear(a.hidden_size, 3 * a.hidden_size)
        self.proj = nn.Linear(a.hidden_size, a.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [n, heads, d]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        outs = []
        for qs, ks, vs in zip(q.split(spans), k.split(spans), v.split(spans), strict=True):
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return self.proj(torch.cat(outs).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, a: ViTArgs):
        super().__init__()
        if a.hidden_act != "silu":
            raise ValueError(f"config key 'model.image_encoder.hidden_act': only 'silu' is supported, got {a.hidden_act!r}")
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, a: ViTArgs):
        super().__init__()
        self.norm1 = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.norm2 = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.attn = VisionAttention(a)
        self.mlp = VisionMLP(a)

    def forward(self, x, cos, sin, spans):
        x = x + self.attn(self.norm1(x), cos, sin, spans)
        return x + self.mlp(self.norm2(x))


class Qwen2_5ViT(nn.Module):
    """Returns patch features [n, hidden] in window order plus the inverse of that order (per merge group)."""

    def __init__(self, a: ViTArgs):
        super().__init__()
        self.args = a
        self.patch_embed = nn.Conv3d(a.in_channels, a.hidden_size, bias=False,
                                     kernel_size=(a.temporal_patch_size, a.patch_size, a.patch_size),
                                     stride=(a.temporal_patch_size, a.patch_size, a.patch_size))
        self.blocks = nn.ModuleList(VisionBlock(a) for _ in range(a.depth))
        quarter = a.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / a.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter),
                             persistent=False)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        unit = a.spatial_merge_size ** 2
        grid_thw = grid_thw.cpu()
        w = self.patch_embed.weight
        x = self.patch_embed(pixels.to(w.dtype).view(-1, a.in_channels, a.temporal_patch_size, a.patch_size, a.patch_size))
        x = x.view(-1, a.hidden_size)
        n = x.shape[0]
        order, window_spans = window_order(grid_thw, a.spatial_merge_size,
                                           a.window_size // a.spatial_merge_size // a.patch_size)
        order = order.to(x.device)
        x = x.view(n // unit, unit, -1)[order].view(n, -1)
        pos = vision_positions(grid_thw, a.spatial_merge_size).to(x.device)
        angles = (pos.float()[..., None] * self.inv_freq).flatten(1)  # [n, head_dim / 2]: rows then cols
        angles = angles.view(n // unit, unit, -1)[order].view(n, -1)
        emb = torch.cat([angles, angles], -1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        full_spans = image_lengths(grid_thw)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_spans if i in a.fullatt_block_indexes else window_spans)
        return x, torch.argsort(order)


def build(section) -> Qwen2_5ViT:
    """``ModelComponent.builder``: the encoder from its ``model.image_encoder`` section."""
    return Qwen2_5ViT(component_args(ViTArgs, section, "model.image_encoder"))


def image_processor(encoder: dict, projector: dict):
    """Qwen2.5-VL dynamic resolution (``model.image_encoder.min_pixels/max_pixels``)."""
    from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor

    return Qwen2_5ImageProcessor.from_encoder_section(encoder)


def hf_rules(hf_prefix: str, ours_prefix: str) -> list[tuple[str, str]]:
    """HF parameter name patterns -> ours (identical layout: only the prefix differs)."""
    return [(f"{hf_prefix}patch_embed.proj.weight", f"{ours_prefix}patch_embed.weight"),
            (f"{hf_prefix}blocks.", f"{ours_prefix}blocks.")]
