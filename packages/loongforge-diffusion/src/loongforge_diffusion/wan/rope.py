"""3D rotary position embedding of the Wan DiT.

Each attention head's ``D`` channels are split into three parts (``WanConfig.rope_dims``: frame,
row, column; the row and column parts are ``2 * (D // 6)`` each, the frame part the rest). A token
at latent-patch position ``(f, h, w)`` rotates the pairs of each part by ``pos * theta ** (-2k /
d_part)``, pairs being adjacent channels ``(2k, 2k + 1)`` (diffusers' ``repeat_interleave_real``
layout). Positions are explicit per token, so packed clips restart at ``(0, 0, 0)`` and a
context-parallel rank gets the positions of its own tokens.
"""

from __future__ import annotations

import torch


def grid_positions(frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """``[frames * height * width, 3]`` integer positions of a patch grid, frame-major (the token order)."""
    f = torch.arange(frames, device=device)
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    return torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_angles(positions: torch.Tensor, dims: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``[..., D / 2]`` (float64) for integer positions ``[..., 3]``."""
    parts = []
    for axis, d in enumerate(dims):
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d))
        parts.append(positions[..., axis].to(torch.float64).unsqueeze(-1) * inv)
    return torch.cat(parts, dim=-1)


def rope_cos_sin(positions: torch.Tensor, dims: tuple[int, int, int], theta: float = 10000.0):
    """``(cos, sin)`` float32 ``[B, S, 1, D / 2]`` for positions ``[B, S, 3]`` (broadcast over heads)."""
    angles = rope_angles(positions, dims, theta)
    return angles.cos().float().unsqueeze(-2), angles.sin().float().unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` [B, S, H, D] by the angles behind ``cos``/``sin``."""
    pairs = x.float().unflatten(-1, (-1, 2))  # in fp32 like diffusers' fp32 tables, then back
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)
