"""Qwen2.5-VL image preprocessing: dynamic resolution and patch layout.

An image is resized (bicubic) to the size closest to its own whose sides are multiples of
``patch_size * merge_size`` and whose area lies in ``[min_pixels, max_pixels]``, normalised with
the CLIP mean/std, repeated ``temporal_patch_size`` times along time (a still image is a video of
one step) and cut into patches ordered in ``merge_size`` x ``merge_size`` blocks, each flattened as
(channel, time, row, col). The image then becomes ``grid_h * grid_w / merge_size**2`` LLM tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Qwen2_5ImageProcessor:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_encoder_section(cls, section) -> Qwen2_5ImageProcessor:
        s = dict(section)
        kw = {"patch_size": s.get("patch_size", 14), "temporal_patch_size": s.get("temporal_patch_size", 2),
              "merge_size": s.get("spatial_merge_size", 2)}
        for key in ("min_pixels", "max_pixels"):
            if s.get(key) is not None:
                kw[key] = int(s[key])
        for key in ("image_mean", "image_std"):
            if s.get(key) is not None:
                kw[key] = tuple(float(x) for x in s[key])
        return cls(**kw)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is larger than 200")
        h = round(height / factor) * factor
        w = round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return h, w

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The image's ``grid_thw`` row, from its size alone."""
        h, w = self.target_size(height, width)
        return (1, h // self.patch_size, w // self.patch_size)

    def __call__(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``(patches [grid_h * grid_w, C * T * P * P], (1, grid_h, grid_w))`` of a PIL image."""
        from PIL import Image

        image = image.convert("RGB")
        h, w = self.target_size(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        x = (x - np.asarray(self.image_mean, np.float32)[:, None, None]) / np.asarray(self.image_std, np.float32)[:, None, None]
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        c, gh, gw = x.shape[0], h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # blocks, cells, C, rows, cols
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)), (1, gh, gw)

    def num_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // self.merge_size ** 2

    def empty_pixels(self) -> torch.Tensor:
        return torch.zeros(0, 3 * self.temporal_patch_size * self.patch_size ** 2)
