"""LLaVA(-OneVision) projector: Linear -> GELU -> Linear per encoder token, then (OneVision) a
learned newline embedding appended after each image's tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loongforge_vlm.components.common import component_args
from loongforge_vlm.components.siglip import activation


@dataclass(frozen=True)
class LlavaMLPArgs:
    hidden_size: int  # the LLM's hidden size (filled by the provider)
    context_dim: int  # the encoder's hidden size (filled by the provider)
    hidden_act: str = "gelu"
    bias: bool = True
    image_newline: bool = True
    freeze: bool = False


class LlavaMLP(nn.Module):
    def __init__(self, a: LlavaMLPArgs):
        super().__init__()
        self.args = a
        self.linear_1 = nn.Linear(a.context_dim, a.hidden_size, bias=a.bias)
        self.act = activation(a.hidden_act, "model.image_projector.hidden_act")
        self.linear_2 = nn.Linear(a.hidden_size, a.hidden_size, bias=a.bias)
        self.image_newline = nn.Parameter(torch.zeros(a.hidden_size)) if a.image_newline else None

    def forward(self, features: torch.Tensor, restore: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` [n_images, tokens, context_dim] -> [n_images * (tokens + newline), hidden]."""
        out = self.linear_2(self.act(self.linear_1(features)))
        if self.image_newline is not None:
            out = torch.cat([out, self.image_newline.to(out.dtype).expand(out.shape[0], 1, -1)], dim=1)
        return out.reshape(-1, out.shape[-1])


def build(section) -> LlavaMLP:
    return LlavaMLP(component_args(LlavaMLPArgs, section, "model.image_projector"))
