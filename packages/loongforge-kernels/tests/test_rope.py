"""Fused RoPE, QK-norm+RoPE and the fused-QKV RoPE (Triton; interpreted on CPU) vs the references,
fwd and bwd."""

import pytest
import torch
from loongforge_kernels.rope import (
    apply_rope,
    apply_rope_reference,
    apply_rope_triton,
    qk_norm_rope,
    qk_norm_rope_reference,
    qk_norm_rope_triton,
    qkv_rope,
    qkv_rope_reference,
    qkv_rope_triton,
)

pytestmark = pytest.mark.usefixtures("triton_path")

DTYPES = [torch.float32, torch.bfloat16]


def _cos_sin(s, rot_dim, device, layout="4d", base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(device), emb.sin().to(device)
    if layout == "4d":
        return cos[:, None, None, :], sin[:, None, None, :]
    return cos, sin


def _x(kt, shape, dtype, seed=0):
    return kt.leaf((torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype))


def _check(kt, fused, ref, inputs, dtype):
    out, grads, dy = kt.fwd_bwd(fused, inputs)
    ref_out, ref_grads, _ = kt.fwd_bwd(ref, inputs, dy)
    kt.parity(out, ref_out, dtype, "y")
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        kt.parity(a, b, dtype, f"grad[{i}]")


def _check_qk_norm_rope(kt, x, w, cos, sin, dtype):
    _check(
        kt,
        lambda a, wt: qk_norm_rope_triton(a, wt, 1e-6, cos, sin),
        lambda a, wt: qk_norm_rope_reference(a, wt, 1e-6, cos, sin),
        [x, w],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["4d", "2d"])
@pytest.mark.parametrize("rot_frac", [1.0, 0.5])
def test_rope_matches_reference(kt, dtype, layout, rot_frac):
    s, b, h, d = 6, 2, 3, 16
    cos, sin = _cos_sin(s, int(d * rot_frac), kt.device, layout)
    _check(kt, apply_rope_triton, apply_rope_reference, [_x(kt, (s, b, h, d), dtype), cos, sin], dtype)


def test_rope_broadcast_position_and_strided_input(kt):
    """cos/sin with S=1 broadcast over positions; x a strided slice of a fused qkv tensor."""
    s, b, h, d = 5, 2, 4, 8
    qkv = kt.leaf(torch.randn(s, b, h, 3 * d))
    q = qkv[..., :d]  # unit stride on D, strided heads
    cos, sin = _cos_sin(1, d, kt.device, "2d")
    cos, sin = cos + 0.1, sin - 0.2  # not the position-0 identity
    _check(kt, apply_rope_triton, apply_rope_reference, [q, cos, sin], torch.float32)


def test_rope_bf16_x_fp32_tables(kt):
    s, b, h, d = 4, 1, 2, 32
    cos, sin = _cos_sin(s, d, kt.device)
    _check(
        kt,
        apply_rope_triton,
        apply_rope_reference,
        [_x(kt, (s, b, h, d), torch.bfloat16), cos, sin],
        torch.bfloat16,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot_frac", [1.0, 0.75])
def test_qk_norm_rope_matches_reference(kt, dtype, rot_frac):
    s, b, h, d = 5, 2, 3, 16
    cos, sin = _cos_sin(s, int(d * rot_frac) // 2 * 2, kt.device)
    w = kt.leaf((1.0 + 0.2 * torch.randn(d)).to(dtype))
    x = _x(kt, (s, b, h, d), dtype, seed=3)
    _check_qk_norm_rope(kt, x, w, cos, sin, dtype)


def test_qk_norm_rope_many_heads_strided(kt):
    """More heads than one block holds (two head blocks, last one masked), strided [B, S] input."""
    s, b, h, d = 3, 2, 80, 64
    cos, sin = _cos_sin(s, d, kt.device)
    w = kt.leaf(1.0 + 0.2 * torch.randn(d))
    x = kt.leaf(torch.randn(b, s, h, d)).transpose(0, 1)
    _check_qk_norm_rope(kt, x, w, cos, sin, torch.float32)


def test_qk_norm_rope_is_norm_then_rope(kt):
    s, b, h, d = 3, 1, 2, 8
    cos, sin = _cos_sin(s, d, kt.device)
    x = torch.randn(s, b, h, d, device=kt.device)
    w = torch.rand(d, device=kt.device) + 0.5
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    x1, x2 = normed.chunk(2, -1)
    expect = normed * cos + torch.cat([-x2, x1], -1) * sin
    torch.testing.assert_close(qk_norm_rope_triton(x, w, 1e-6, cos, sin), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_angles(kt, dtype):
    """cos/sin [S, B, 1, R]: each sample its own positions (ids restarting at packed documents);
    RoPE and QK-norm+RoPE, with partial rotary dim, vs the reference."""
    s, b, h, d, r = 6, 3, 2, 16, 12
    pos = torch.stack([torch.arange(s), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([4, 0, 1, 2, 3, 0])])
    inv = 1.0 / 10000.0 ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    freqs = pos.t().float()[..., None] * inv  # [s, b, r/2]
    emb = torch.cat([freqs, freqs], -1)[:, :, None, :].to(kt.device)
    cos, sin = emb.cos(), emb.sin()
    x = _x(kt, (s, b, h, d), dtype, seed=5)
    _check(kt, apply_rope_triton, apply_rope_reference, [x, cos, sin], dtype)
    w = kt.leaf((1.0 + 0.2 * torch.randn(d)).to(dtype))
    _check_qk_norm_rope(kt, x, w, cos, sin, dtype)
    with pytest.raises(ValueError):
        apply_rope_triton(x, cos[:, :2], sin[:, :2])  # B neither 1 nor x's


def test_rope_dispatch_and_validation(kt, monkeypatch):
    s, b, h, d = 3, 1, 2, 8
    cos, sin = _cos_sin(s, d, kt.device)
    x = torch.randn(s, b, h, d, device=kt.device)
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    x.requires_grad_(True)
    assert "RopeFunction" in type(apply_rope(x, cos, sin).grad_fn).__name__
    # cos/sin needing a gradient is not fused: the reference runs and differentiates them.
    cos_g = cos.clone().requires_grad_(True)
    assert "RopeFunction" not in type(apply_rope(x, cos_g, sin).grad_fn).__name__
    w = torch.ones(d, device=kt.device)
    assert "RopeFunction" in type(qk_norm_rope(x, w, 1e-6, cos, sin).grad_fn).__name__
    with pytest.raises(ValueError):
        apply_rope_triton(x, cos[..., :3], sin[..., :3])  # odd rotary dim
    with pytest.raises(ValueError):
        apply_rope_triton(x, cos[:2], sin[:2])  # wrong S


def _qkv_check(kt, dtype, s, b, g, qpg, d, cos, sin, norm: bool, use=(True, True, True), seed=0):
    """qkv_rope_triton vs qkv_rope_reference: outputs and the gradients of the fused QKV (and norm
    weights), with random upstream gradients on the outputs in ``use``."""
    gen = torch.Generator().manual_seed(seed)
    mixed = kt.leaf((torch.randn(s, b, g, (qpg + 2) * d, generator=gen) * 2).to(dtype))
    weights = [kt.leaf((1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)) for _ in range(2)] if norm else []
    inputs = [mixed, *weights]

    def run(fn):
        outs = fn(mixed, qpg, cos, sin, *weights, eps=1e-6)
        return outs, [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + i)).to(o)
                      for i, o in enumerate(outs)]

    outs, ups = run(qkv_rope_triton)
    ref_outs, _ = run(qkv_rope_reference)
    picked = [(o, u) for o, u, keep in zip(outs, ups, use, strict=True) if keep]
    grads = torch.autograd.grad([o for o, _ in picked], inputs, [u for _, u in picked], allow_unused=True)
    ref_picked = [(o, u) for o, u, keep in zip(ref_outs, ups, use, strict=True) if keep]
    ref_grads = torch.autograd.grad([o for o, _ in ref_picked], inputs, [u for _, u in ref_picked],
                                    allow_unused=True)
    assert outs[0].shape == (s, b, g * qpg, d) and outs[1].shape == outs[2].shape == (s, b, g, d)
    for name, a, r in zip("qkv", outs, ref_outs, strict=True):
        kt.parity(a.detach(), r.detach(), dtype, name)
    for i, (a, r) in enumerate(zip(grads, ref_grads, strict=True)):
        if r is None:
            assert a is None or not a.any(), f"grad[{i}]"
        else:
            kt.parity(a, r, dtype, f"grad[{i}]")
    return outs, mixed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_qkv_rope_matches_megatron_split_then_rope(kt, dtype, norm):
    s, b, g, qpg, d = 5, 2, 3, 2, 16
    cos, sin = _cos_sin(s, d, kt.device)
    (q, k, v), mixed = _qkv_check(kt, dtype, s, b, g, qpg, d, cos, sin, norm)
    # v is the fused tensor's own memory, not a copy
    assert v.untyped_storage().data_ptr() == mixed.untyped_storage().data_ptr()


@pytest.mark.parametrize("norm", [False, True])
def test_qkv_rope_partial_rotary_per_sample_angles_and_unused_outputs(kt, norm):
    s, b, g, qpg, d = 4, 3, 2, 3, 8
    cos, sin = _cos_sin(s * b, d // 2, kt.device, "2d")  # a different angle row per (s, b)
    cos, sin = cos.view(s, b, 1, d // 2), sin.view(s, b, 1, d // 2)
    for use in ((True, True, True), (True, False, True), (False, True, False)):
        _qkv_check(kt, torch.float32, s, b, g, qpg, d, cos, sin, norm, use=use, seed=3)


def test_qkv_rope_dispatch_and_validation(kt):
    mixed = torch.randn(2, 1, 2, 42, device=kt.device)  # not (2 + 2) x a head dim
    cos, sin = _cos_sin(2, 8, kt.device)
    with pytest.raises(ValueError, match="q_per_group=2"):
        qkv_rope(mixed, 2, cos, sin)
    with pytest.raises(ValueError, match="both q and k norm weights"):
        qkv_rope_triton(torch.randn(2, 1, 2, 4 * 8, device=kt.device), 2, cos, sin,
                        q_norm_weight=torch.ones(8, device=kt.device))
    # cos/sin needing grad are not constants for the fused path: the reference runs
    q, _, _ = qkv_rope(torch.randn(2, 1, 2, 4 * 8, device=kt.device), 2, cos.requires_grad_(), sin)
    assert q.grad_fn is not None and "QKVRope" not in type(q.grad_fn).__name__
