"""LLaVA-OneVision "anyres" tiling of a single image: the geometry shared by the preprocessing
(:class:`AnyresImageProcessor`) and the projector (``components.llava_mlp``), so that the number of
image tokens the text gets always equals what the model produces.

An image of ``H x W`` goes to the candidate resolution (``image_grid_pinpoints``, multiples of the
tile size ``S``) that keeps the most of its pixels and wastes the least (:func:`best_resolution`),
is resized into it keeping its aspect ratio, padded (centred) and cut into ``rows x cols`` tiles of
``S``; a base tile (the whole image resized to ``S x S``) comes first. In the model, the tiles'
feature grids are stitched into one ``rows*g x cols*g`` map, the padding is cut off again
(:func:`unpadded_size`), the map is shrunk bilinearly when it holds more than ``1.1^2 x max_tiles``
tiles' worth of features, and a newline token ends every row. Tokens: ``g^2`` (base) + the map +
one per map row. Without ``image_grid_pinpoints`` (or for a grid of one tile) the image is the
base tile plus one newline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loongforge_vlm.data.fixed_image import FixedImageProcessor


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The candidate (h, w) keeping most of the image's pixels, then wasting the fewest."""
    best, most, least = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (int(h), int(w)), effective, wasted
    return best


def fit_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The image's size resized into ``target`` with its aspect ratio kept."""
    th, tw = target
    if tw / width < th / height:
        return min(math.ceil(height * tw / width), th), tw
    return th, min(math.ceil(width * th / height), tw)


def unpadded_size(height: int, width: int, map_h: int, map_w: int) -> tuple[int, int, int]:
    """(rows, cols) of a ``map_h x map_w`` feature map without the padding an ``height x width``
    image got, and the padding cut from each side of the padded axis."""
    if width / height > map_w / map_h:
        new_h = int(round(height * (map_w / width), 7))
        pad = (map_h - new_h) // 2
        return map_h - 2 * pad, map_w, pad
    new_w = int(round(width * (map_h / height), 7))
    pad = (map_w - new_w) // 2
    return map_h, map_w - 2 * pad, pad


def downsampled(rows: int, cols: int, g: int, max_tiles: int) -> tuple[int, int]:
    """The map size after OneVision's shrink (``anyres_max_<max_tiles>``)."""
    ratio = math.sqrt(rows * cols / (max_tiles * g * g))
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)


@dataclass(frozen=True)
class AnyresGeometry:
    tile: int  # S, the encoder's image_size
    grid: int  # g, feature tokens per tile side
    pinpoints: tuple[tuple[int, int], ...]
    max_tiles: int = 9

    def tiles(self, height: int, width: int) -> tuple[int, int]:
        h, w = best_resolution(height, width, self.pinpoints)
        return h // self.tile, w // self.tile

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the image's feature map after unpadding and shrinking."""
        r, c = self.tiles(height, width)
        rows, cols, _ = unpadded_size(height, width, r * self.grid, c * self.grid)
        return downsampled(rows, cols, self.grid, self.max_tiles)

    def num_tokens(self, height: int, width: int) -> int:
        rows, cols = self.map_size(height, width)
        return self.grid ** 2 + rows * (cols + 1)


@dataclass(frozen=True)
class AnyresImageProcessor(FixedImageProcessor):
    """``(pixels [1 + tiles, C, S, S], grid (1 + tiles, H, W))``: the base tile, then the tiles row by
    row; the grid carries the original size the projector needs to unpad."""

    pinpoints: tuple[tuple[int, int], ...] = ()
    max_tiles: int = 9

    @property
    def geometry(self) -> AnyresGeometry:
        return AnyresGeometry(self.image_size, self.image_size // self.patch_size, self.pinpoints, self.max_tiles)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        r, c = self.geometry.tiles(height, width)
        return (1 + r * c, height, width)

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32).transpose(2, 0, 1) / 255.0
        return (x - np.asarray(self.image_mean, np.float32)[:, None, None]) / np.asarray(self.image_std, np.float32)[:, None, None]

    def __call__(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        from PIL import Image

        s = self.image_size
        image = image.convert("RGB")
        width, height = image.size
        target = best_resolution(height, width, self.pinpoints)
        h, w = fit_size(height, width, target)
        canvas = np.zeros((*target, 3), dtype=np.uint8)
        top, left = (target[0] - h) // 2, (target[1] - w) // 2
        canvas[top:top + h, left:left + w] = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
        tiles = [canvas[r:r + s, c:c + s] for r in range(0, target[0], s) for c in range(0, target[1], s)]
        base = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC))
        x = np.stack([self._normalise(t) for t in [base, *tiles]])
        return torch.from_numpy(x), self.grid(height, width)

    def num_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        tiles, height, width = grid_thw
        return self.tokens if tiles == 1 else self.geometry.num_tokens(height, width)
