"""Fixed-resolution image preprocessing (SigLIP, InternViT): resize to ``image_size`` squared
(bicubic), scale to [0, 1], normalise; the image becomes a constant number of LLM tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FixedImageProcessor:
    image_size: int
    patch_size: int
    tokens: int  # LLM tokens per image
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_sections(cls, encoder: dict, image_size: int, patch_size: int, *, tokens: int,
                      mean: tuple[float, ...], std: tuple[float, ...]) -> FixedImageProcessor:
        """``model.image_encoder.image_mean/image_std`` override the encoder's defaults."""
        mean = tuple(float(x) for x in encoder.get("image_mean") or mean)
        std = tuple(float(x) for x in encoder.get("image_std") or std)
        return cls(image_size, patch_size, tokens, mean, std)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The image's ``grid_thw`` row, from its size alone."""
        g = self.image_size // self.patch_size
        return (1, g, g)

    def __call__(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``(pixels [1, C, S, S], (1, S / patch, S / patch))`` of a PIL image."""
        from PIL import Image

        s = self.image_size
        image = image.convert("RGB")
        if image.size != (s, s):
            image = image.resize((s, s), Image.Resampling.BICUBIC)
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        x = (x - np.asarray(self.image_mean, np.float32)[:, None, None]) / np.asarray(self.image_std, np.float32)[:, None, None]
        g = s // self.patch_size
        return torch.from_numpy(np.ascontiguousarray(x))[None], (1, g, g)

    def num_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        return self.tokens

    def empty_pixels(self) -> torch.Tensor:
        return torch.zeros(0, 3, self.image_size, self.image_size)
