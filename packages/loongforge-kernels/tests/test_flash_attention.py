"""Triton flash attention (interpreted on CPU, compiled on CUDA) vs the fp32 reference, fwd and bwd:
causal and full, grouped KV heads, megatron's [S, B, H, D] memory order passed as permuted views."""

import pytest
import torch
from loongforge_kernels.flash_attention import flash_attention_reference, flash_attention_triton, unsupported

pytestmark = pytest.mark.usefixtures("triton_path")


def _qkv(kt, b, h, h_kv, s, d, dtype, sbhd: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, s, d), (b, h_kv, s, d), (b, h_kv, s, d))
    if sbhd:  # [S, B, H, D] tensors seen as [B, H, S, D], as megatron's attention hands them over
        return [kt.leaf(torch.randn(s, b, n, d, generator=g).to(dtype)).permute(1, 2, 0, 3)
                for (_, n, _, _) in shapes]
    return [kt.leaf(torch.randn(shape, generator=g).to(dtype)) for shape in shapes]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_flash_attention_matches_reference(kt, causal, dtype, heads):
    if dtype == torch.float32 and kt.device.type == "cuda":
        pytest.skip("the compiled kernels take float16/bfloat16")
    if dtype == torch.bfloat16 and kt.device.type == "cpu":
        pytest.skip("Triton 3.9's CPU interpreter miscomputes tl.dot on bfloat16 (a 16x16 product off by 1e10)")
    q, k, v = _qkv(kt, 2, *heads, 128, 32, dtype, sbhd=True)
    out, grads, dy = kt.fwd_bwd(lambda *t: flash_attention_triton(*t, causal=causal), [q, k, v])
    ref, ref_grads, _ = kt.fwd_bwd(lambda *t: flash_attention_reference(*t, causal=causal), [q, k, v], dy)
    kt.parity(out, ref, dtype, "out")
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        kt.parity(got, want, dtype, f"d{name}")


def test_flash_attention_output_keeps_megatron_memory_order(kt):
    """The output of [S, B, H, D]-ordered inputs is [S, B, H, D] in memory: megatron's following
    reshape to [S, B, H * D] is a view, not a copy."""
    q, k, v = _qkv(kt, 2, 4, 2, 128, 16, torch.float32 if kt.device.type == "cpu" else torch.bfloat16, sbhd=True)
    out = flash_attention_triton(q, k, v)
    assert out.permute(2, 0, 1, 3).is_contiguous()


def test_flash_attention_says_why_it_does_not_apply(kt):
    q = torch.randn(1, 4, 96, 64, device=kt.device)
    assert "multiples of 128" in unsupported(q, q, q, causal=True)
    q = torch.randn(1, 3, 128, 64, device=kt.device)
    k = torch.randn(1, 2, 128, 64, device=kt.device)
    assert "not a multiple" in unsupported(q, k, k, causal=True)
    q = torch.randn(1, 2, 128, 80, device=kt.device)
    assert "head dim 80" in unsupported(q, q, q, causal=False)
    with pytest.raises(RuntimeError, match="head dim 80"):
        flash_attention_triton(q, q, q)
