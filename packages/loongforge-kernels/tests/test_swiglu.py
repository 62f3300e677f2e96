"""Fused SwiGLU (Triton; interpreted on CPU) vs the reference, fwd and bwd."""

import pytest
import torch
from loongforge_kernels.swiglu import swiglu, swiglu_reference, swiglu_triton

pytestmark = pytest.mark.usefixtures("triton_path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 33), (2, 3, 2 * 64), (3, 2 * 1500)])
def test_swiglu_matches_reference(kt, dtype, shape):
    x = kt.leaf((torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype))
    out, grads, dy = kt.fwd_bwd(swiglu_triton, [x])
    ref, ref_grads, _ = kt.fwd_bwd(swiglu_reference, [x], dy)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    kt.parity(out, ref, dtype, "y")
    kt.parity(grads[0], ref_grads[0], dtype, "dx")


def test_swiglu_layout_is_gate_then_up(kt):
    gate = torch.tensor([[1.0, -2.0]])
    up = torch.tensor([[3.0, 0.5]])
    x = torch.cat([gate, up], dim=-1).to(kt.device)
    expect = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(swiglu_triton(x).cpu(), expect)
    torch.testing.assert_close(swiglu_reference(x).cpu(), expect)


def test_swiglu_non_contiguous_input(kt):
    x = kt.leaf(torch.randn(6, 4, 2 * 16)).transpose(0, 1)
    out, grads, dy = kt.fwd_bwd(swiglu_triton, [x])
    ref, ref_grads, _ = kt.fwd_bwd(swiglu_reference, [x], dy)
    kt.parity(out, ref, torch.float32, "y")
    kt.parity(grads[0], ref_grads[0], torch.float32, "dx")


def test_swiglu_rejects_odd_width(kt, monkeypatch):
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    with pytest.raises(ValueError):
        swiglu(torch.randn(2, 7, device=kt.device))
