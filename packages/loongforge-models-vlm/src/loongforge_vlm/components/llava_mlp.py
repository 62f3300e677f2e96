"""LLaVA(-OneVision) projector: Linear -> GELU -> Linear per encoder token, then (OneVision) a
learned newline embedding appended after each image's tokens.

With ``image_grid_pinpoints`` (anyres, :mod:`loongforge_vlm.data.anyres`) an image arrives as a base
tile plus ``rows x cols`` tiles (``grid_thw`` row: (1 + tiles, H, W) with the original size): the
tiles' features are stitched into one map, unpadded, shrunk past ``max_tiles`` tiles' worth, and
each map row ends with the newline token; the base tile's tokens come first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    #: anyres tiling: candidate (height, width) resolutions, multiples of the encoder's image_size
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    #: OneVision's ``anyres_max_<n>``: shrink the stitched map to about n tiles' worth of features
    max_tiles: int = 9
    image_size: int = 0  # the encoder's tile size and patch size (filled from it with anyres)
    patch_size: int = 0
    freeze: bool = False


class LlavaMLP(nn.Module):
    def __init__(self, a: LlavaMLPArgs):
        super().__init__()
        self.args = a
        self.linear_1 = nn.Linear(a.context_dim, a.hidden_size, bias=a.bias)
        self.act = activation(a.hidden_act, "model.image_projector.hidden_act")
        self.linear_2 = nn.Linear(a.hidden_size, a.hidden_size, bias=a.bias)
        self.image_newline = nn.Parameter(torch.zeros(a.hidden_size)) if a.image_newline else None
        self.geometry = None
        if a.image_grid_pinpoints:
            from loongforge_vlm.data.anyres import AnyresGeometry

            if not a.image_newline:
                raise ValueError("config key 'model.image_projector.image_grid_pinpoints' (anyres) needs image_newline: true")
            self.geometry = AnyresGeometry(a.image_size, a.image_size // a.patch_size,
                                           tuple(tuple(p) for p in a.image_grid_pinpoints), a.max_tiles)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` [tiles, tokens, context_dim] -> [LLM tokens of all images, hidden]."""
        out = self.linear_2(self.act(self.linear_1(features)))
        if self.image_newline is None:
            return out.reshape(-1, out.shape[-1])
        newline = self.image_newline.to(out.dtype)
        if self.geometry is None or grid_thw is None:
            return torch.cat([out, newline.expand(out.shape[0], 1, -1)], dim=1).reshape(-1, out.shape[-1])
        images = []
        for x, (tiles, height, width) in zip(out.split(grid_thw[:, 0].tolist()), grid_thw.tolist(), strict=True):
            images.append(self._pack(x, tiles, height, width, newline) if tiles > 1
                          else torch.cat([x[0], newline[None]]))
        return torch.cat(images)

    def _pack(self, x: torch.Tensor, tiles: int, height: int, width: int, newline: torch.Tensor) -> torch.Tensor:
        from loongforge_vlm.data.anyres import downsampled, unpadded_size

        geo, g = self.geometry, self.geometry.grid
        r, c = geo.tiles(height, width)
        if r * c != tiles - 1:
            raise ValueError(f"an image of {height}x{width} has {r}x{c} anyres tiles, the batch gives {tiles - 1}")
        grid = x[1:].view(r, c, g, g, -1).permute(4, 0, 2, 1, 3).reshape(x.shape[-1], r * g, c * g)  # [d, rows, cols]
        rows, cols, pad = unpadded_size(height, width, r * g, c * g)
        grid = grid[:, pad:pad + rows] if rows < r * g else grid[:, :, pad:pad + cols]
        size = downsampled(rows, cols, g, geo.max_tiles)
        if size != (rows, cols):
            grid = F.interpolate(grid[None], list(size), mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], dim=-1)
        return torch.cat([x[0], grid.flatten(1).t()])


def build(section) -> LlavaMLP:
    from loongforge.config import ConfigError

    try:
        return LlavaMLP(component_args(LlavaMLPArgs, section, "model.image_projector"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
