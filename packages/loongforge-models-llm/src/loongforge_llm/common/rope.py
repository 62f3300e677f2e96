"""RoPE inverse frequencies exactly as HuggingFace computes them.

megatron-core 0.19.2's ``RotaryEmbedding(rope_scaling=True, rope_scaling_factor=f)`` implements
the ``llama3`` formula but hard-codes ``low_freq_factor=1``, ``high_freq_factor=4`` and
``original_max_position_embeddings=8192`` (only the factor is an argument). Those are the values
of every published LLaMA 3.1/3.2 checkpoint, but a config with other values would silently get
wrong frequencies. So the provider builds ``GPTModel`` without megatron's scaling and replaces the
rotary module's ``inv_freq`` (a plain tensor attribute, not a buffer or a checkpointed parameter)
with :func:`inv_freq` below, which follows transformers' ``_compute_llama3_parameters`` /
``_compute_linear_scaling_rope_parameters`` for any values. The test suite checks both the
agreement with megatron-core on the published values and with transformers on others.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def default_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    return 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """float32 ``[head_dim // 2]`` inverse frequencies for ``rope_scaling`` (``None``, ``linear`` or ``llama3``)."""
    freqs = default_inv_freq(head_dim, rope_theta)
    if rope_scaling is None:
        return freqs
    rope_type = rope_scaling["rope_type"]
    factor = float(rope_scaling["factor"])
    if rope_type == "linear":
        return freqs / factor
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type {rope_type!r}")
    low = float(rope_scaling["low_freq_factor"])
    high = float(rope_scaling["high_freq_factor"])
    old_len = float(rope_scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def install_inv_freq(rotary_pos_emb: torch.nn.Module, freqs: torch.Tensor) -> None:
    """Give a megatron-core ``RotaryEmbedding`` these frequencies (before its first forward)."""
    current = rotary_pos_emb.inv_freq
    if current.shape != freqs.shape:
        raise ValueError(f"rotary inv_freq has shape {tuple(current.shape)}, the computed one {tuple(freqs.shape)}")
    rotary_pos_emb.inv_freq = freqs.to(device=current.device, dtype=current.dtype)
    cache_clear = getattr(type(rotary_pos_emb).forward, "cache_clear", None)
    if cache_clear is not None:  # forward() memoises embeddings per (module, seq_len)
        cache_clear()
