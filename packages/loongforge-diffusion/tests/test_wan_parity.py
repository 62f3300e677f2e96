"""Our WanDiT equals diffusers' WanTransformer3DModel (same tiny config and weights, fp32 CPU)."""

import pytest
import torch
from loongforge_diffusion.testing import A14B, I2V21, TI2V, reference, rel_err
from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.model import WanDiT
from loongforge_diffusion.wan.weights import load_diffusers_into, weight_mapping


def _pair(kwargs, tmp_path, **pipeline):
    ref = reference(kwargs)
    ref.save_pretrained(tmp_path / "ref")
    wan = WanConfig.from_diffusers(dict(ref.config), **pipeline)
    ours = WanDiT(wan).eval()
    load_diffusers_into(ours, tmp_path / "ref")
    return ref, ours


def _inputs(c, b=2, f=3, h=8, w=6, text=7, text_dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, f, h, w, generator=g)
    ctx = torch.randn(b, text, text_dim, generator=g)
    return x, ctx, g


def test_ti2v_per_token_timesteps(megatron_cpu, tmp_path):
    ref, ours = _pair(TI2V, tmp_path, expand_timesteps=True, vae_scale_factor_spatial=16)
    x, ctx, g = _inputs(48)
    seq = 3 * 4 * 3
    t = torch.rand(2, seq, generator=g) * 1000
    t[:, :12] = 0.0  # the first latent frame as a clean condition (TI2V image-to-video)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert got.shape == want.shape == x.shape
    assert rel_err(got, want) < 1e-5


def test_a14b_t2v(megatron_cpu, tmp_path):
    ref, ours = _pair(A14B, tmp_path, boundary_ratio=0.875)
    x, ctx, _ = _inputs(16)
    t = torch.tensor([999.0, 17.5])
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert rel_err(got, want) < 1e-5


def test_wan21_i2v_image_branch(megatron_cpu, tmp_path):
    ref, ours = _pair(I2V21, tmp_path)
    x, ctx, g = _inputs(36, text=512)  # diffusers hard-codes a 512-token text context here
    img = torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([500.0, 3.0])
    with torch.no_grad():
        want = ref(x, t, ctx, encoder_hidden_states_image=img,
                   return_dict=False)[0]
        got = ours(x, t, ctx, context_image=img)
    assert rel_err(got, want) < 1e-5


def test_gradients_match(megatron_cpu, tmp_path):
    """Backward too: input gradients and a block weight's gradient agree."""
    ref, ours = _pair(A14B, tmp_path)
    x, ctx, _ = _inputs(16)
    t = torch.tensor([250.0, 750.0])
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr, t, ctx, return_dict=False)[0].square().mean().backward()
    ours(xo, t, ctx).square().mean().backward()
    assert rel_err(xo.grad, xr.grad) < 1e-5
    assert rel_err(ours.blocks[1].mlp.linear_fc1.weight.grad, ref.blocks[1].ffn.net[0].proj.weight.grad) < 1e-5
    assert rel_err(ours.blocks[0].self_attn.norm_q.weight.grad, ref.blocks[0].attn1.norm_q.weight.grad) < 1e-5


def test_mapping_covers_every_reference_tensor():
    for kw in (TI2V, A14B, I2V21):
        ref = reference(kw)
        wan = WanConfig.from_diffusers(dict(ref.config))
        m = weight_mapping(wan)
        assert m.unmapped_hf(ref.state_dict().keys()) == []
        assert sorted(m.hf_names()) == sorted(ref.state_dict().keys())


def test_bad_latent_shape_names_patch_size(megatron_cpu):
    ours = WanDiT(WanConfig.from_diffusers(dict(A14B)))
    with pytest.raises(ValueError, match="patch_size"):
        ours(torch.randn(1, 16, 2, 7, 8), torch.tensor([1.0]), torch.randn(1, 3, 32))
