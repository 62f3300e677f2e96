"""The foreach multi-tensor ops and torch's fused AdamW (with the clipping factor as its
``grad_scale``) give megatron-core's optimizer step the same result as its own per-tensor
fallbacks, clipping and multi-tensor AdamW (norm, clipping, master -> bf16 parameter copy), on a
real GPTModel with megatron DDP and the bf16 mixed-precision optimizer."""

from __future__ import annotations

import contextlib

import pytest
import torch
from loongforge.testing import megatron_adam, megatron_train_step, single_process_megatron, tiny_bf16_gpt
from loongforge.trainer import multi_tensor
from loongforge.trainer.optim import use_fused_adam

STEPS = 3
LR = 1e-2


def _train(patched: bool):
    from megatron.core.optimizer import clip_grads

    with single_process_megatron(seed=7):
        model, _ = tiny_bf16_gpt()
        optimizer = megatron_adam(model, LR, clip_grad=0.05)
        if patched:
            use_fused_adam(optimizer)
        grad_scales = []  # what the torch optimizer's step sees
        optimizer.chained_optimizers[0].optimizer.register_step_pre_hook(
            lambda opt, *_: grad_scales.append(getattr(opt, "grad_scale", None)))
        if patched:
            with multi_tensor.foreach_multi_tensor_ops():
                assert clip_grads.l2_norm_impl is multi_tensor.l2norm
        tokens = torch.randint(0, 96, (STEPS, 2, 17), generator=torch.Generator().manual_seed(3))
        norms = []
        for step in range(STEPS):
            ops = multi_tensor.foreach_multi_tensor_ops if patched else contextlib.nullcontext
            _, (ok, grad_norm, _) = megatron_train_step(model, optimizer, tokens[step], ops)
            assert ok
            # patched: the norm stays on the device (megatron's tensor path, no .item() before the step)
            assert isinstance(grad_norm, torch.Tensor) is patched
            assert getattr(optimizer.chained_optimizers[0].optimizer, "grad_scale", None) is None
            norms.append(float(grad_norm))
        inner = optimizer.chained_optimizers[0]
        assert all(bool(g["fused"]) is patched for g in inner.optimizer.param_groups)
        masters = [p.detach().clone() for group in inner.fp32_from_float16_groups for p in group]
        return norms, masters, [p.detach().float().clone() for p in model.parameters()], grad_scales


def test_foreach_ops_and_fused_adam_match_megatron_fallbacks():
    ref_norms, ref_masters, ref_params, ref_scales = _train(patched=False)
    norms, masters, params, scales = _train(patched=True)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert min(ref_norms) > 0.05, "clipping must be exercised"
    # megatron clips the grads in place; ours hands the factor to the fused AdamW (grads / grad_scale)
    assert ref_scales == [None] * STEPS
    assert [float(s) for s in scales] == pytest.approx([n / 0.05 for n in norms], rel=1e-5)
    # fused and multi-tensor AdamW round differently; Adam's m / sqrt(v) turns that into up to
    # ~1e-3 of an update (lr) on elements whose gradients are ~0, and ~1e-9 everywhere else
    off = sum(int(((ours - ref).abs() > 1e-6).sum()) for ours, ref in zip(masters, ref_masters, strict=True))
    assert off <= 1e-3 * sum(m.numel() for m in masters)
    for ours, ref in zip(masters, ref_masters, strict=True):
        assert torch.allclose(ours, ref, rtol=0, atol=LR / 100)
    for ours, ref in zip(params, ref_params, strict=True):
        # bf16 parameters copied from fp32 masters that agree to ~1e-7: at most one bf16 ulp apart
        assert torch.allclose(ours, ref, rtol=2**-7, atol=1e-6)
    moved = sum((p - q).abs().sum() for p, q in zip(params, ref_params, strict=True))
    total = sum(p.abs().sum() for p in params)
    assert moved / total < 1e-3
