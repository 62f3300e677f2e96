"""SigLIP vision transformer (the image encoder of LLaVA-OneVision).

Fixed input size: ``pixels`` [n_images, C, image_size, image_size] (``data.fixed_image``). A conv
patch embedding plus learned absolute positions, then pre-LayerNorm blocks (multi-head attention,
tanh-GELU MLP). The output is the last block's hidden states [n_images, patches, hidden] without
the final LayerNorm, as LLaVA-OneVision reads them (``vision_feature_layer=-1``, strategy ``full``);
SigLIP's post-norm and pooling head are not part of a VLM and are not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loongforge_vlm.components.common import component_args
from loongforge_vlm.components.tensor_parallel import Shardable


@dataclass(frozen=True)
class SiglipArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    image_size: int = 384
    patch_size: int = 14
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    freeze: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def activation(name: str, key: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"config key '{key}': unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over each image's patches (q/k/v/out with bias)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(hidden, inner), nn.Linear(inner, hidden), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, a: SiglipArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.self_attn = SelfAttention(a.hidden_size, a.num_heads)
        self.layer_norm2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.mlp = MLP(a.hidden_size, a.intermediate_size, activation(a.hidden_act, "model.image_encoder.hidden_act"))

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, a: SiglipArgs):
        super().__init__()
        self.patch_embedding = nn.Conv2d(a.in_channels, a.hidden_size, a.patch_size, stride=a.patch_size)
        self.position_embedding = nn.Embedding(a.grid ** 2, a.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class SiglipViT(Shardable, nn.Module):
    #: tensor-parallel split (``model.image_encoder.parallel.tp``): heads and MLP columns
    TP_PLAN = {r"layers\.\d+\.self_attn\.[qkv]_proj": "column", r"layers\.\d+\.self_attn\.out_proj": "row",
               r"layers\.\d+\.mlp\.fc1": "column", r"layers\.\d+\.mlp\.fc2": "row"}

    def __init__(self, a: SiglipArgs):
        super().__init__()
        self.args = a
        self.embeddings = Embeddings(a)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.depth))

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``pixels`` [n, C, S, S] -> (features [n, (S / patch)^2, hidden], ``grid_thw`` for the
        projector: with anyres tiling it says which tiles form which image)."""
        a = self.args
        if pixels.dim() != 4 or pixels.shape[-2:] != (a.image_size, a.image_size):
            raise ValueError(f"the SigLIP encoder takes images of {a.image_size}x{a.image_size} "
                             f"(model.image_encoder.image_size); got pixel_values of shape {tuple(pixels.shape)}")
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return x, grid_thw


def build(section) -> SiglipViT:
    """``ModelComponent.builder``."""
    return SiglipViT(component_args(SiglipArgs, section, "model.image_encoder"))


def image_processor(encoder: dict, projector: dict):
    """The preprocessing this encoder needs: a fixed square resize; one token per patch (plus the
    projector's newline token when it has one)."""
    from loongforge_vlm.data.fixed_image import FixedImageProcessor

    a = component_args(SiglipArgs, encoder, "model.image_encoder")
    base = FixedImageProcessor.from_sections(encoder, a.image_size, a.patch_size,
                                             tokens=a.grid ** 2 + int(bool(projector.get("image_newline"))),
                                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if not projector.get("image_grid_pinpoints"):
        return base
    import dataclasses

    from loongforge_vlm.data.anyres import AnyresImageProcessor

    return AnyresImageProcessor(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                                pinpoints=tuple(tuple(int(v) for v in p) for p in projector["image_grid_pinpoints"]),
                                max_tiles=int(projector.get("max_tiles") or 9))
