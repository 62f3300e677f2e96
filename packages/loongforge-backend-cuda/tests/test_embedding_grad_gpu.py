"""Embedding / LM-head gradients into DDP's fp32 ``main_grad`` on a GPU (compiled Triton, NCCL
world of one; skipped without CUDA): the embedding backward is deterministic at the Llama-3.2-1B
shape, and a tiny GPTModel in DDP trains like the unfused path. Run with
``pytest packages/loongforge-backend-cuda/tests/test_embedding_grad_gpu.py -m gpu -s`` (``-s``
shows the timings of the old and new gradient paths)."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers (pytest imports tests by path)
from test_embedding_grad import check_against_unfused  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

V, H, TOKENS = 128256, 2048, 8 * 2048


@contextlib.contextmanager
def _seeded():
    from loongforge_cuda.backend import CudaBackend

    CudaBackend().manual_seed(5)
    yield


def _ids(n: int, seed: int) -> torch.Tensor:
    """Token ids with many repeats (a skewed draw), as in text."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) ** 4 * V).long().cuda()


def _ms(fn, reps: int = 10) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_embedding_grad_into_main_grad_is_deterministic_and_exact(cuda_mcore):
    from loongforge_cuda.embedding_grad import _EmbeddingIntoMainGrad

    weight = torch.nn.Parameter(torch.randn(V, H, device="cuda").to(torch.bfloat16))
    prev = torch.randn(V, H, device="cuda") * 1e-2
    ids = _ids(TOKENS, 0)
    assert ids.bincount().max() > 500  # rows repeated hundreds of times (the low ids)
    grad = torch.randn(TOKENS, H, device="cuda").to(torch.bfloat16)

    def run():
        weight.main_grad = prev.clone()
        weight.grad = None
        _EmbeddingIntoMainGrad.apply(ids, weight, True).backward(grad)
        assert weight.grad_added_to_main_grad
        return weight.main_grad

    first, second = run(), run()
    assert torch.equal(first, second), "not deterministic"
    expect = prev.double().index_add_(0, ids, grad.double())
    # fp32 sums of up to ~900 repeats of a row (values ~30): within fp32 rounding
    torch.testing.assert_close(first.double(), expect, rtol=1e-5, atol=1e-4)

    # the step's gradient traffic for this weight, old path vs new (printed, not asserted): ids
    # drawn uniformly, and skewed as above (index_put_ sums a row's repeats one after another, so
    # its time grows with the most frequent token's count)
    gw_unit = torch.randn(V, H, device="cuda")
    common = torch.tensor(0.5, device="cuda")
    main_grad = torch.zeros(V, H, device="cuda")
    for name, draw in (("uniform", torch.randint(0, V, (TOKENS,), device="cuda")), ("skewed", ids)):
        def old(draw=draw):
            lm = torch.mul(gw_unit, common, out=torch.empty_like(weight))
            lm.add_(torch.ops.aten.embedding_dense_backward(grad, draw, V, -1, False))
            main_grad.add_(lm)

        def new(draw=draw):
            main_grad.addcmul_(gw_unit, common)
            main_grad.index_put_((draw,), grad.float(), accumulate=True)

        def embedding_only(draw=draw):
            main_grad.index_put_((draw,), grad.float(), accumulate=True)

        top = int(draw.bincount().max())
        print(f"\n[{V}, {H}] weight gradient into main_grad, {TOKENS} {name} ids (top count {top}): "
              f"old path {_ms(old):.3f} ms, new {_ms(new):.3f} ms (of which index_put_ {_ms(embedding_only):.3f})")


@pytest.mark.parametrize("tied, overlap", [(True, False), (True, True), (False, True)])
def test_gpu_training_matches_unfused(cuda_mcore, tied, overlap, monkeypatch):
    # bit for bit: the fused buffers against their recomputed contributions (deterministic
    # kernels); other gradients within 1e-3 (the unfused embedding backward uses atomics)
    check_against_unfused(tied, overlap, monkeypatch, _seeded, exact_elsewhere=False)
