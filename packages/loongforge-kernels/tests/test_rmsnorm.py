"""Fused RMSNorm (Triton; interpreted on CPU) vs the HF-numerics reference, fwd and bwd."""

import pytest
import torch
from loongforge_kernels.rmsnorm import (
    add_rms_norm,
    add_rms_norm_reference,
    add_rms_norm_triton,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
)

pytestmark = pytest.mark.usefixtures("triton_path")

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(kt, shape, dtype, wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0
    w = 1.0 + 0.3 * torch.randn(shape[-1], generator=g)
    return kt.leaf(x.to(dtype)), kt.leaf(w.to(wdtype or dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 40), (2, 3, 64), (5, 1000)])
def test_rmsnorm_matches_reference(kt, dtype, shape):
    x, w = _inputs(kt, shape, dtype)
    out, grads, dy = kt.fwd_bwd(lambda a, b: rms_norm_triton(a, b, 1e-6), [x, w])
    ref, ref_grads, _ = kt.fwd_bwd(lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], dy)
    kt.parity(out, ref, dtype, "y")
    kt.parity(grads[0], ref_grads[0], dtype, "dx")
    kt.parity(grads[1], ref_grads[1], dtype, "dw")


def test_rmsnorm_mixed_dtypes_follow_hf(kt):
    """bf16 activations with an fp32 weight: normalised in fp32, rounded to bf16, output fp32."""
    x, w = _inputs(kt, (6, 48), torch.bfloat16, torch.float32)
    out, grads, dy = kt.fwd_bwd(lambda a, b: rms_norm_triton(a, b, 1e-5), [x, w])
    ref, ref_grads, _ = kt.fwd_bwd(lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], dy)
    assert out.dtype == torch.float32
    kt.parity(out, ref, torch.bfloat16, "y")
    kt.parity(grads[0], ref_grads[0], torch.bfloat16, "dx")
    kt.parity(grads[1], ref_grads[1], torch.bfloat16, "dw")


def test_rmsnorm_non_contiguous_and_frozen_weight(kt):
    base = torch.randn(8, 3, 32)
    x = kt.leaf(base).transpose(0, 1)  # [3, 8, 32], leading dims strided
    w = (1.0 + 0.1 * torch.randn(32)).to(kt.device)  # no grad
    out, grads, dy = kt.fwd_bwd(lambda a: rms_norm_triton(a, w, 1e-6), [x])
    ref, ref_grads, _ = kt.fwd_bwd(lambda a: rms_norm_reference(a, w, 1e-6), [x], dy)
    kt.parity(out, ref, torch.float32, "y")
    kt.parity(grads[0], ref_grads[0], torch.float32, "dx")


def test_rmsnorm_dispatch(kt, monkeypatch):
    x, w = _inputs(kt, (4, 16), torch.float32)
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "reference")
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert "RMSNormFunction" not in type(rms_norm(x, w, 1e-6).grad_fn).__name__
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    assert "RMSNormFunction" in type(rms_norm(x, w, 1e-6).grad_fn).__name__
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "auto")
    fused = "RMSNormFunction" in type(rms_norm(x, w, 1e-6).grad_fn).__name__
    assert fused == (x.device.type == "cuda")


def _add_inputs(kt, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(shape, generator=g) * s for s in (2.0, 1.5))
    w = 1.0 + 0.3 * torch.randn(shape[-1], generator=g)
    return kt.leaf(x.to(dtype)), kt.leaf(r.to(dtype)), kt.leaf(w.to(dtype))


def _add_fwd_bwd(fn, inputs, uses, grads_out=None, seed=1):
    """Run ``fn`` -> (y, h); backprop random upstream grads into the outputs named in ``uses``."""
    y, h = fn(*inputs)
    outs = [t for t, name in ((y, "y"), (h, "h")) if name in uses]
    if grads_out is None:
        g = torch.Generator().manual_seed(seed)
        grads_out = [torch.randn(t.shape, generator=g).to(device=t.device, dtype=t.dtype) for t in outs]
    grads = torch.autograd.grad(outs, inputs, grads_out, materialize_grads=True)  # h only: no dw
    return (y.detach(), h.detach()), grads, grads_out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "uses"),
    [((7, 48), "yh"), ((3, 2, 1000), "yh"), ((2, 3, 64), "y"), ((5, 48), "h")],
)
def test_add_rmsnorm_matches_unfused(kt, dtype, shape, uses):
    """(y, h) and (dx, dresidual, dw) vs the unfused torch ops, with grads into y and h, y only
    (dh is None) or h only (dy is None)."""
    inputs = _add_inputs(kt, shape, dtype)
    (y, h), grads, dout = _add_fwd_bwd(lambda a, b, c: add_rms_norm_triton(a, b, c, 1e-6), inputs, uses)
    (ry, rh), ref_grads, _ = _add_fwd_bwd(
        lambda a, b, c: add_rms_norm_reference(a, b, c, 1e-6), inputs, uses, dout
    )
    assert y.is_contiguous() and h.is_contiguous() and h.dtype == dtype
    kt.parity(y, ry, dtype, "y")
    kt.parity(h, rh, dtype, "h")
    for name, a, b in zip(("dx", "dresidual", "dw"), grads, ref_grads, strict=True):
        kt.parity(a, b, dtype, name)
    assert torch.equal(grads[0], grads[1])
    if uses == "h":  # the gradient passes straight through; nothing reaches the weight
        assert torch.equal(grads[0], dout[0]) and not grads[2].any()


def test_add_rmsnorm_fp32_is_the_unfused_ops(kt):
    """fp32: h bit-exact, y and the gradients to fp32 rounding, for a strided residual."""
    x, _, w = _add_inputs(kt, (6, 40), torch.float32)
    r = kt.leaf(torch.randn(40, 6)).t()  # unit stride on the leading dim, not on D
    (y, h), grads, dout = _add_fwd_bwd(add_rms_norm_triton, [x, r, w], "yh")
    (ry, rh), ref_grads, _ = _add_fwd_bwd(add_rms_norm_reference, [x, r, w], "yh", dout)
    assert torch.equal(h, rh)
    kt.parity(y, ry, torch.float32, "y")
    for name, a, b in zip(("dx", "dresidual", "dw"), grads, ref_grads, strict=True):
        kt.parity(a, b, torch.float32, name)


def test_add_rmsnorm_dispatch_and_errors(kt, monkeypatch):
    x, r, w = _add_inputs(kt, (4, 16), torch.float32)
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    assert "AddRMSNorm" in type(add_rms_norm(x, r, w)[0].grad_fn).__name__
    # a broadcast residual is outside the kernel: the reference handles it
    y, h = add_rms_norm(x, r[:1], w)
    assert "AddRMSNorm" not in type(y.grad_fn).__name__
    assert torch.equal(h, x + r[:1])
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_triton(x, r.double(), w)
    with pytest.raises(ValueError, match="weight shape"):
        add_rms_norm_triton(x, r, w[:8])
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "reference")
    assert "AddRMSNorm" not in type(add_rms_norm(x, r, w)[0].grad_fn).__name__


def test_add_rmsnorm_normalises_the_rounded_sum(kt):
    """bf16: y and dx are exactly the plain fused RMSNorm's on the h the kernel wrote (the norm
    reads h rounded to bf16, not the fp32 sum), dx with dh added once on top."""
    x, r, w = _add_inputs(kt, (5, 200), torch.bfloat16)
    (y, h), grads, (dy, dh) = _add_fwd_bwd(add_rms_norm_triton, [x, r, w], "yh")
    h_leaf = kt.leaf(h)
    y_plain = rms_norm_triton(h_leaf, w, 1e-6)
    dnorm, dw = torch.autograd.grad(y_plain, [h_leaf, w], dy)
    assert torch.equal(y, y_plain.detach())
    assert torch.equal(grads[2], dw)
    kt.parity(grads[0], (dnorm.float() + dh.float()).to(torch.bfloat16), torch.bfloat16, "dx")
