"""Fused RMSNorm (Triton; interpreted on CPU) vs the HF-numerics reference, fwd and bwd."""

import pytest
import torch
from loongforge_kernels.rmsnorm import rms_norm, rms_norm_reference, rms_norm_triton

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
