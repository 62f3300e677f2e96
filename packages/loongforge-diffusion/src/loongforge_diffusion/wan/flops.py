"""Model FLOPs of the Wan DiT (for MFU) and the latent shape of a clip (no torch import)."""

from __future__ import annotations

from loongforge_diffusion.wan.config import WanConfig


def wan_flops_per_sample(wan: WanConfig, video_tokens: int, text_tokens: int) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 x forward), matmuls only.

    Per block, with ``S`` video tokens, ``L`` text tokens, hidden ``d``, FFN ``f``:
    self-attention projections ``8 S d^2`` + scores/values ``4 S^2 d``; cross-attention q/out
    ``4 S d^2`` + k/v ``4 L d^2`` + scores/values ``4 S L d``; MLP ``4 S d f``. Outside the blocks:
    patch embedding ``2 S (C_in p) d``, output ``2 S d (C_out p)``, text embedding
    ``2 L (d_text d + d^2)``, time embedding/projection ``2 n (d_freq d + d^2 + 6 d^2)`` with
    ``n = S`` for per-token timesteps (TI2V) else 1.
    """
    S, L, d, f = video_tokens, text_tokens, wan.hidden_size, wan.ffn_dim
    block = 8 * S * d * d + 4 * S * S * d + 4 * S * d * d + 4 * L * d * d + 4 * S * L * d + 4 * S * d * f
    p = wan.patch_volume
    n = S if wan.expand_timesteps else 1
    outer = (2 * S * wan.in_channels * p * d + 2 * S * d * wan.out_channels * p
             + 2 * L * (wan.text_dim * d + d * d) + 2 * n * (wan.freq_dim * d + 7 * d * d))
    return 3.0 * (wan.num_layers * block + outer)


def latent_grid(wan: WanConfig, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent ``(F, H, W)`` of a clip after the VAE."""
    return ((num_frames - 1) // wan.vae_scale_factor_temporal + 1, height // wan.vae_scale_factor_spatial,
            width // wan.vae_scale_factor_spatial)
