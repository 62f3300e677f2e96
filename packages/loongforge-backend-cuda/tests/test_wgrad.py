"""Weight-gradient accumulation fusion: megatron-core's linear layers add their weight gradients
straight into DDP's fp32 ``main_grad`` (through our apex-compatible torch implementation) and the
buffers match megatron's default path (bf16 weight gradient, then DDP's add) on a real GPTModel."""

from __future__ import annotations

import pytest
import torch
from loongforge.testing import single_process_megatron, tiny_bf16_gpt
from loongforge_cuda.wgrad import TorchWgradAccumulation, fuse_wgrad_accumulation, wgrad_accumulation_patch

MICRO_BATCHES = 2


def _main_grads(fused: bool):
    """DDP's gradient buffers after two accumulated micro-batches, and how many layers were fused."""
    with single_process_megatron(seed=11), wgrad_accumulation_patch():
        ddp, _ = tiny_bf16_gpt(share_embeddings_and_output_weights=False)
        switched = fuse_wgrad_accumulation([ddp]) if fused else 0
        tokens = torch.randint(0, 96, (MICRO_BATCHES, 2, 17), generator=torch.Generator().manual_seed(5))
        positions = torch.arange(16).expand(2, 16)
        ddp.zero_grad_buffer()
        for mb in range(MICRO_BATCHES):
            ddp(tokens[mb, :, :-1], positions, None, labels=tokens[mb, :, 1:]).float().mean().backward()
        ddp.finish_grad_sync()
        return {n: p.main_grad.clone() for n, p in ddp.named_parameters()}, switched


def test_fused_wgrad_accumulation_matches_ddp_add(monkeypatch):
    calls = []
    real = TorchWgradAccumulation.wgrad_gemm_accum_fp32
    monkeypatch.setattr(TorchWgradAccumulation, "wgrad_gemm_accum_fp32",
                        staticmethod(lambda x, dy, acc: calls.append(acc.shape) or real(x, dy, acc)))
    ref, _ = _main_grads(fused=False)
    assert not calls
    ours, switched = _main_grads(fused=True)
    # 2 layers x (qkv, proj, fc1, fc2) + the untied output layer, each once per micro-batch
    assert switched == 9 and len(calls) == 9 * MICRO_BATCHES
    linear = [n for n in ref if n.endswith(".weight") and ("linear_" in n or "output_layer" in n)]
    assert len(linear) == 9
    for name in ref:
        assert ours[name].abs().sum() > 0, name
        # ours skips the bf16 rounding of each micro-batch's weight gradient: equal within bf16 rounding
        torch.testing.assert_close(ours[name], ref[name], rtol=2e-2, atol=2e-2 * ref[name].abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_without_ddp_nothing_is_fused():
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    with single_process_megatron():
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
        linear = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.zeros_, bias=False)
        assert fuse_wgrad_accumulation([linear]) == 0
        assert linear.gradient_accumulation_fusion is False


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.bfloat16])
def test_wgrad_gemm_accumulates_in_place(acc_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (24, 8), generator=g).to(torch.bfloat16)  # small integers: exact sums
    dy = torch.randint(-3, 4, (24, 6), generator=g).to(torch.bfloat16)
    acc = torch.full((6, 8), 0.5, dtype=acc_dtype)
    buffer = acc
    accumulate = (TorchWgradAccumulation.wgrad_gemm_accum_fp32 if acc_dtype == torch.float32
                  else TorchWgradAccumulation.wgrad_gemm_accum_fp16)
    accumulate(x, dy, acc)
    assert acc is buffer and acc.dtype == acc_dtype
    torch.testing.assert_close(acc.float(), 0.5 + dy.float().t() @ x.float(), rtol=0, atol=0)
