"""Test helpers: tiny reference configs with the sizes diffusers' own Wan tests use (2 layers, 2 heads x 12, FFN 32)."""

import torch

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=256,
            ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
TI2V = dict(TINY, in_channels=48, out_channels=48)            # Wan2.2 TI2V-5B style (expand_timesteps)
A14B = dict(TINY, in_channels=16, out_channels=16)            # Wan2.2 A14B T2V style
I2V21 = dict(A14B, in_channels=36, image_dim=16, added_kv_proj_dim=24)  # Wan2.1 I2V image branch


def reference(kwargs, seed=0):
    """diffusers' WanTransformer3DModel with every parameter perturbed (norms and tables too)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
