"""Each installed Dao-AILab flash-attention against torch's math attention in fp32, forward and
backward, on megatron's layout with grouped KV heads (bf16 kernel vs fp32 reference: the
kernel's error must stay within 2x that of torch's math attention run in bf16)."""

from __future__ import annotations

import pytest
import torch
from loongforge_cuda import flash_attn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or not flash_attn.installed(),
                                                  reason="needs a CUDA GPU and an installed flash-attention")]


def _grads(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal=True, scale=q.shape[-1] ** -0.5)
    out.backward(grad)
    return [out.float(), *(t.grad.float() for t in leaves)]


@pytest.mark.parametrize("name", flash_attn.installed())
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attn_matches_math_attention(name, head_dim):
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, h, h_kv = 512, 2, 8, 2
    q, k, v = (torch.randn(s, b, n, head_dim, device="cuda", generator=g).permute(1, 2, 0, 3) for n in (h, h_kv, h_kv))
    grad = torch.randn(s, b, h, head_dim, device="cuda", generator=g).permute(1, 2, 0, 3)
    truth = _grads(flash_attn.attention_reference, q, k, v, grad)
    bf16 = [t.bfloat16() for t in (q, k, v, grad)]
    ours = _grads(getattr(flash_attn, name), *bf16)
    math_bf16 = _grads(flash_attn.attention_reference, *bf16)
    for what, o, m, t in zip(("out", "dq", "dk", "dv"), ours, math_bf16, truth, strict=True):
        err, bound = ((o - t).norm() / t.norm()).item(), ((m - t).norm() / t.norm()).item()
        assert err <= 2 * bound + 1e-3, f"{name} {what}: rel err {err:.2e}, math bf16 {bound:.2e}"
