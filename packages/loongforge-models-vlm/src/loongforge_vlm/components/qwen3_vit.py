"""Qwen3-VL vision transformer: 3D-conv patch embedding (with bias), a learned position table
interpolated to each image's grid, 2D RoPE, LayerNorm blocks with full attention per frame, and the
hidden states of the DeepStack blocks returned beside the last one.

Inputs follow the Qwen2-VL-style preprocessing (``loongforge_vlm.data.qwen2_5_image`` with patch
16 and mean/std 0.5): ``pixels`` [n_patches, C * T * P * P] of all images (or video clips)
concatenated, the patches of each frame ordered in ``spatial_merge_size`` x ``spatial_merge_size``
blocks, and ``grid_thw`` [n_items, 3].

Position table: ``num_position_embeddings`` = side^2 learned vectors on a side x side grid, resized
bilinearly (corners aligned) to each frame's h x w patch grid, then laid out in the same merge-block
order as the patches. Attention spans one frame. The projector (``qwen3_merger``) merges the last
hidden state and each DeepStack state to LLM tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loongforge_vlm.components.common import component_args
from loongforge_vlm.components.qwen2_5_vit import (
    VisionAttention,
    image_lengths,
    vision_positions,
)

ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


@dataclass(frozen=True)
class Qwen3ViTArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    #: blocks whose output also feeds the LLM (DeepStack), in injection order
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    freeze: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check(self) -> None:
        side = round(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"config key 'model.image_encoder.num_position_embeddings' must be a square, "
                             f"got {self.num_position_embeddings}")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"config key 'model.image_encoder.deepstack_visual_indexes': {bad} outside the "
                             f"{self.depth} blocks")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"config key 'model.image_encoder.hidden_act': {self.hidden_act!r} is not one of "
                             f"{', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    def __init__(self, a: Qwen3ViTArgs):
        super().__init__()
        self.linear_fc1 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.linear_fc2 = nn.Linear(a.intermediate_size, a.hidden_size)
        self.act = ACTIVATIONS[a.hidden_act]

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Block(nn.Module):
    def __init__(self, a: Qwen3ViTArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.norm2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.attn = VisionAttention(a)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, spans):
        x = x + self.attn(self.norm1(x), cos, sin, spans)
        return x + self.mlp(self.norm2(x))


class Qwen3ViT(nn.Module):
    """``forward(pixels, grid_thw) -> (hidden [n, d], deepstack)``: ``deepstack`` is the tuple of the
    hidden states after each block of ``deepstack_visual_indexes`` (the projector merges them)."""

    def __init__(self, a: Qwen3ViTArgs):
        super().__init__()
        a.check()
        self.args = a
        self.patch_embed = nn.Conv3d(a.in_channels, a.hidden_size, bias=True,
                                     kernel_size=(a.temporal_patch_size, a.patch_size, a.patch_size),
                                     stride=(a.temporal_patch_size, a.patch_size, a.patch_size))
        self.pos_embed = nn.Embedding(a.num_position_embeddings, a.hidden_size)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.depth))
        quarter = a.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / a.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter),
                             persistent=False)

    def position_embeddings(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The learned table resized to each frame's grid, in the patches' merge-block order [n, d]."""
        m = self.args.spatial_merge_size
        side = round(self.args.num_position_embeddings ** 0.5)
        table = self.pos_embed.weight.t().reshape(1, -1, side, side)
        out = []
        for t, h, w in grid_thw.tolist():
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [d, h, w]
            grid = grid.reshape(-1, h // m, m, w // m, m).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
            out.append(grid.repeat(t, 1))
        return torch.cat(out)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        a = self.args
        grid_thw = grid_thw.cpu()
        w = self.patch_embed.weight
        x = self.patch_embed(pixels.to(w.dtype).view(-1, a.in_channels, a.temporal_patch_size, a.patch_size, a.patch_size))
        x = x.view(-1, a.hidden_size)
        x = x + self.position_embeddings(grid_thw).to(x.dtype)
        pos = vision_positions(grid_thw, a.spatial_merge_size).to(x.device)
        angles = (pos.float()[..., None] * self.inv_freq.to(x.device)).flatten(1)  # [n, head_dim / 2]: rows then cols
        emb = torch.cat([angles, angles], -1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        spans = image_lengths(grid_thw)
        taps = {}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, spans)
            if i in a.deepstack_visual_indexes:
                taps[i] = x
        return x, tuple(taps[i] for i in a.deepstack_visual_indexes)


def build(section) -> Qwen3ViT:
    """``ModelComponent.builder``: the encoder from its ``model.image_encoder`` section."""
    from loongforge.config import ConfigError

    try:
        return Qwen3ViT(component_args(Qwen3ViTArgs, section, "model.image_encoder"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


#: Qwen3-VL's preprocessor_config.json normalisation
MEAN_STD = (0.5, 0.5, 0.5)


def image_processor(encoder: dict, projector: dict):
    """Qwen2-VL-style dynamic resolution with Qwen3-VL's defaults (patch 16, mean/std 0.5)."""
    from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor

    section = {"image_mean": MEAN_STD, "image_std": MEAN_STD, "patch_size": 16, **{k: v for k, v in dict(encoder).items()
                                                                                     if v is not None}}
    return Qwen2_5ImageProcessor.from_encoder_section(section)


def video_processor(encoder: dict, projector: dict):
    """Qwen3-VL video sampling and sizing (``model.image_encoder.video_fps/video_min_frames/
    video_max_frames/video_min_pixels/video_max_pixels``; defaults: Qwen3-VL's video processor)."""
    from loongforge_vlm.data.video import Qwen3VideoProcessor

    section = {"image_mean": MEAN_STD, "image_std": MEAN_STD, **{k: v for k, v in dict(encoder).items() if v is not None}}
    return Qwen3VideoProcessor.from_encoder_section(section)
