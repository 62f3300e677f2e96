"""InternVL projector: pixel shuffle (each k x k block of patch tokens -> one token with k^2 times
the channels), then LayerNorm -> Linear -> GELU -> Linear to the LLM's hidden size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loongforge_vlm.components.common import component_args
from loongforge_vlm.components.internvit import shuffle_factor
from loongforge_vlm.components.siglip import activation


def pixel_shuffle(x: torch.Tensor, k: int) -> torch.Tensor:
    """[b, H, W, C] -> [b, H / k, W / k, k * k * C]; the token at (i, j) concatenates the inputs at
    (k i + di, k j + dj) in (di, dj) order."""
    b, h, w, c = x.shape
    return x.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // k, w // k, k * k * c)


def pixel_unshuffle(y: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`pixel_shuffle`."""
    b, h, w, kkc = y.shape
    c = kkc // (k * k)
    return y.view(b, h, w, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * k, w * k, c)


@dataclass(frozen=True)
class InternVLMLPArgs:
    hidden_size: int  # the LLM's hidden size (filled by the provider)
    context_dim: int  # the encoder's hidden size (filled by the provider)
    downsample_ratio: float = 0.5
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    freeze: bool = False


class InternVLMLP(nn.Module):
    def __init__(self, a: InternVLMLPArgs):
        super().__init__()
        self.args = a
        self.k = shuffle_factor(a.downsample_ratio)
        inner = a.context_dim * self.k ** 2
        self.layer_norm = nn.LayerNorm(inner, eps=a.layer_norm_eps)
        self.linear_1 = nn.Linear(inner, a.hidden_size)
        self.act = activation(a.hidden_act, "model.image_projector.hidden_act")
        self.linear_2 = nn.Linear(a.hidden_size, a.hidden_size)

    def forward(self, features: torch.Tensor, restore: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` [n_images, g * g, context_dim] -> [n_images * (g / k)^2, hidden]."""
        n, t, c = features.shape
        g = int(round(t ** 0.5))
        x = pixel_shuffle(features.view(n, g, g, c), self.k).reshape(n, -1, c * self.k ** 2)
        x = self.linear_2(self.act(self.linear_1(self.layer_norm(x))))
        return x.reshape(-1, x.shape[-1])


def build(section) -> InternVLMLP:
    return InternVLMLP(component_args(InternVLMLPArgs, section, "model.image_projector"))
