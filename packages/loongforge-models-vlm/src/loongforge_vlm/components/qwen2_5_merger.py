"""Qwen2.5-VL patch merger: RMSNorm, then each ``spatial_merge_size``^2 neighbouring encoder tokens
concatenated -> Linear -> GELU -> Linear to the LLM's hidden size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loongforge_vlm.components.common import RMSNorm, component_args


@dataclass(frozen=True)
class MergerArgs:
    hidden_size: int  # the LLM's hidden size (the provider fills it from model.foundation)
    context_dim: int  # the encoder's hidden size (filled from model.image_encoder)
    spatial_merge_size: int = 2
    rms_norm_eps: float = 1e-6
    freeze: bool = False


class Qwen2_5Merger(nn.Module):
    def __init__(self, a: MergerArgs):
        super().__init__()
        self.args = a
        self.inner = a.context_dim * a.spatial_merge_size ** 2
        self.ln_q = RMSNorm(a.context_dim, a.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(self.inner, self.inner), nn.GELU(), nn.Linear(self.inner, a.hidden_size))

    def forward(self, features: torch.Tensor, restore: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` [n, context_dim] -> [n / merge^2, hidden]; ``restore`` reorders merged tokens
        (the encoder's window order back to image order)."""
        out = self.mlp(self.ln_q(features).view(-1, self.inner))
        return out if restore is None else out[restore]


def build(section) -> Qwen2_5Merger:
    return Qwen2_5Merger(component_args(MergerArgs, section, "model.image_projector"))
