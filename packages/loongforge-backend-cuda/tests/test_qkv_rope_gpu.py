"""Qwen3's fused-QKV QK-norm + RoPE on a GPU (compiled Triton, NCCL world of one; skipped without
CUDA): fp32 on == off within 1e-5, and in bf16 the fused path is as close to the fp32 model as the
separate norm + RoPE path is. Run with ``pytest packages/loongforge-backend-cuda -m gpu``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers (pytest imports tests by path)
from test_qkv_rope import CountingBackend, _assert_close, _assert_fused, _build, _compare, _run  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAME, SEQ, BATCH = "qwen3/qwen3_tiny", 128, 2


def test_gpu_fp32_fused_equals_separate(cuda_mcore):
    _, _, calls_on, calls_off, errs, config = _compare(NAME, seq=SEQ, batch=BATCH, device="cuda")
    _assert_fused(calls_on, calls_off, config.num_layers)
    _assert_close(errs)


def test_gpu_bf16_fused_as_close_to_fp32_as_separate(cuda_mcore):
    """bf16 rounds differently along the two paths (the kernel computes RoPE in fp32 and rounds
    once); judged against the fp32 model, the fused path's error is no larger than the separate one's."""
    truth_backend = CountingBackend(["qkv_rope"])
    truth, provider, _ = _build(NAME, truth_backend, seq=SEQ, device="cuda")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, provider.args.vocab_size, (BATCH, SEQ), generator=g).cuda()
    weights = torch.rand(BATCH, SEQ, truth.vocab_size, generator=g).cuda()
    ref_logits, ref_grads = _run(truth, truth_backend, tokens, weights=weights)

    def errors(disable):
        backend = CountingBackend(disable)
        model, _, _ = _build(NAME, backend, seq=SEQ, bf16=True, device="cuda")
        model.load_state_dict(truth.state_dict())
        logits, grads = _run(model, backend, tokens, weights=weights)

        def rel(a, b):
            return ((a.float() - b).norm() / b.norm()).item()

        return backend.calls, {"logits": rel(logits, ref_logits), **{n: rel(grads[n], ref_grads[n]) for n in grads}}

    calls_on, on = errors(())
    _, off = errors(["qkv_rope"])
    assert calls_on["qkv_rope"] > 0 and calls_on["rope"] == 0, calls_on
    worse = {n: (on[n], off[n]) for n in off if not on[n] <= 1.5 * off[n] + 1e-3}
    print(f"\nbf16 vs fp32, fused / separate: logits {on['logits']:.2e} / {off['logits']:.2e}; "
          f"worst grad {max(v for k, v in on.items() if k != 'logits'):.2e} / "
          f"{max(v for k, v in off.items() if k != 'logits'):.2e}")
    assert not worse, f"fused bf16 error above the separate path's (fused, separate): {worse}"
