"""InternViT-300M-style vision transformer (the image encoder of InternVL 2.5 / 3).

Fixed input size: ``pixels`` [n_images, C, image_size, image_size] (one 448 px tile each for the
real model; ``data.fixed_image``). A conv patch embedding, a CLS token and learned absolute
positions, then pre-LayerNorm blocks whose attention and MLP outputs are scaled per channel by
learned layer-scale vectors (``lambda_1``, ``lambda_2``). The output is the last block's patch
tokens [n_images, patches, hidden] (CLS dropped, no final norm: InternVL's mean-pooling variant),
which the ``internvl_mlp`` projector pixel-shuffles and projects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loongforge_vlm.components.common import component_args
from loongforge_vlm.components.siglip import activation
from loongforge_vlm.components.tensor_parallel import Shardable


@dataclass(frozen=True)
class InternViTArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    image_size: int = 448
    patch_size: int = 14
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    attention_bias: bool = True
    layer_scale_init_value: float = 0.1
    freeze: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class Attention(nn.Module):
    def __init__(self, a: InternViTArgs):
        super().__init__()
        self.heads = a.num_heads
        h = a.hidden_size
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, h, bias=a.attention_bias) for _ in range(3))
        self.projection_layer = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.projection_layer(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, a: InternViTArgs):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(a.hidden_size, a.intermediate_size), nn.Linear(a.intermediate_size, a.hidden_size)
        self.act = activation(a.hidden_act, "model.image_encoder.hidden_act")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, a: InternViTArgs):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.attention = Attention(a)
        self.layernorm_after = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.mlp = MLP(a)
        self.lambda_1 = nn.Parameter(torch.full((a.hidden_size,), a.layer_scale_init_value))
        self.lambda_2 = nn.Parameter(torch.full((a.hidden_size,), a.layer_scale_init_value))

    def forward(self, x):
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class PatchEmbeddings(nn.Module):
    def __init__(self, a: InternViTArgs):
        super().__init__()
        self.projection = nn.Conv2d(a.in_channels, a.hidden_size, a.patch_size, stride=a.patch_size)


class Embeddings(nn.Module):
    def __init__(self, a: InternViTArgs):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.hidden_size))
        self.patch_embeddings = PatchEmbeddings(a)
        self.position_embeddings = nn.Parameter(torch.zeros(1, a.grid ** 2 + 1, a.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        conv = self.patch_embeddings.projection
        x = conv(pixels.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings


class InternViT(Shardable, nn.Module):
    #: tensor-parallel split (``model.image_encoder.parallel.tp``): heads and MLP columns
    TP_PLAN = {r"layers\.\d+\.attention\.[qkv]_proj": "column", r"layers\.\d+\.attention\.projection_layer": "row",
               r"layers\.\d+\.mlp\.fc1": "column", r"layers\.\d+\.mlp\.fc2": "row"}

    def __init__(self, a: InternViTArgs):
        super().__init__()
        self.args = a
        self.embeddings = Embeddings(a)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.depth))

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """``pixels`` [n, C, S, S] -> (patch features [n, (S / patch)^2, hidden], None: no reordering)."""
        a = self.args
        if pixels.dim() != 4 or pixels.shape[-2:] != (a.image_size, a.image_size):
            raise ValueError(f"the InternViT encoder takes images of {a.image_size}x{a.image_size} "
                             f"(model.image_encoder.image_size); got pixel_values of shape {tuple(pixels.shape)}")
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:], None


def build(section) -> InternViT:
    """``ModelComponent.builder``."""
    return InternViT(component_args(InternViTArgs, section, "model.image_encoder"))


def image_processor(encoder: dict, projector: dict):
    """One fixed-size tile per image; the projector's pixel shuffle keeps ``downsample_ratio``^2 of
    the patch tokens."""
    from loongforge_vlm.data.fixed_image import IMAGENET_MEAN, IMAGENET_STD, FixedImageProcessor

    a = component_args(InternViTArgs, encoder, "model.image_encoder")
    k = shuffle_factor(projector.get("downsample_ratio", 0.5))
    if a.grid % k:
        raise ValueError(f"config key 'model.image_projector.downsample_ratio': the {a.grid}x{a.grid} patch grid "
                         f"cannot be pixel-shuffled by {k}")
    return FixedImageProcessor.from_sections(encoder, a.image_size, a.patch_size, tokens=(a.grid // k) ** 2,
                                             mean=IMAGENET_MEAN, std=IMAGENET_STD)


def shuffle_factor(downsample_ratio: float) -> int:
    k = round(1 / downsample_ratio)
    if k < 1 or abs(k * downsample_ratio - 1) > 1e-6:
        raise ValueError(f"config key 'model.image_projector.downsample_ratio' must be 1/k for an integer k, "
                         f"got {downsample_ratio}")
    return k
