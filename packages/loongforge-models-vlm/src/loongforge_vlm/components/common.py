"""Pieces shared by the vision components: RMSNorm and reading a component's config section."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from loongforge.config import ConfigError
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as the HF vision towers do), weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


#: keys every component section may carry beyond its own fields (selection, parallel layout, data)
COMMON_KEYS = ("name", "parallel", "min_pixels", "max_pixels", "image_mean", "image_std",
               "video_fps", "video_min_frames", "video_max_frames", "video_min_pixels", "video_max_pixels")


def component_args(cls, section: Any, where: str):
    """The dataclass ``cls`` from a config section; unknown keys fail naming ``where.key``."""
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and k not in COMMON_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)} "
                          f"(valid: {', '.join(sorted(names | set(COMMON_KEYS)))})")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and d.get(f.name) is None]
    if missing:
        raise ConfigError(f"config key(s) missing: {', '.join(f'{where}.{k}' for k in missing)}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names and v is not None}
    return cls(**kwargs)
