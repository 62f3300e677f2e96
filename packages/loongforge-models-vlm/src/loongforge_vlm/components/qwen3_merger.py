"""Qwen3-VL patch merger and DeepStack mergers.

The main merger: LayerNorm over each encoder token, then each ``spatial_merge_size``^2 neighbouring
tokens concatenated -> Linear -> GELU -> Linear to the LLM's hidden size. One DeepStack merger per
tapped encoder block: the same, except that the LayerNorm runs over the concatenated group
("post-shuffle" norm). ``forward`` returns ``(tokens, deepstack)``; the model adds ``deepstack[i]``
to the output of LLM layer ``i`` at the visual positions (``loongforge_vlm.deepstack``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loongforge_vlm.components.common import component_args


@dataclass(frozen=True)
class Qwen3MergerArgs:
    hidden_size: int  # the LLM's hidden size (the provider fills it from model.foundation)
    context_dim: int  # the encoder's hidden size (filled from model.image_encoder)
    spatial_merge_size: int = 2
    #: DeepStack mergers: one per entry of the encoder's deepstack_visual_indexes (filled from it)
    num_deepstack: int = 0
    layer_norm_eps: float = 1e-6
    freeze: bool = False


class Merger(nn.Module):
    def __init__(self, a: Qwen3MergerArgs, postshuffle_norm: bool):
        super().__init__()
        self.inner = a.context_dim * a.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.inner if postshuffle_norm else a.context_dim, eps=a.layer_norm_eps)
        self.linear_fc1 = nn.Linear(self.inner, self.inner)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.inner, a.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.inner)) if self.postshuffle_norm else self.norm(x).view(-1, self.inner)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3Merger(Merger):
    """The main merger (its parameters at the top level, as HF's ``visual.merger``) plus the
    DeepStack mergers (``deepstack_merger_list``)."""

    def __init__(self, a: Qwen3MergerArgs):
        super().__init__(a, postshuffle_norm=False)
        self.args = a
        self.deepstack_merger_list = nn.ModuleList(Merger(a, postshuffle_norm=True) for _ in range(a.num_deepstack))

    @property
    def num_deepstack(self) -> int:
        return self.args.num_deepstack

    def forward(self, features: torch.Tensor, deepstack: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, list]:
        """``features`` [n, context_dim] -> ([n / merge^2, hidden], [[n / merge^2, hidden] per DeepStack tap])."""
        if len(deepstack) != self.num_deepstack:
            raise ValueError(f"the encoder gave {len(deepstack)} DeepStack states, the projector has "
                             f"{self.num_deepstack} mergers (model.image_projector.num_deepstack)")
        return super().forward(features), [m(x) for m, x in zip(self.deepstack_merger_list, deepstack, strict=True)]


def build(section) -> Qwen3Merger:
    return Qwen3Merger(component_args(Qwen3MergerArgs, section, "model.image_projector"))
