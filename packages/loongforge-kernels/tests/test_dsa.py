"""DSA lightning indexer: the reference against the definition (CPU) and the TileLang kernel
against the reference (GPU, ``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
from loongforge_kernels.dsa import lightning_indexer, lightning_indexer_reference, tilelang_available


def test_reference_matches_definition_and_cpu_dispatch_uses_it():
    g = torch.Generator().manual_seed(0)
    q, k, w = torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 7, 8, generator=g), torch.randn(2, 5, 3, generator=g)
    expected = torch.zeros(2, 5, 7)
    for b in range(2):
        for s in range(5):
            for t in range(7):
                expected[b, s, t] = sum(w[b, s, h] * torch.relu(0.5 * q[b, s, h] @ k[b, t]) for h in range(3))
    torch.testing.assert_close(lightning_indexer_reference(q, k, w, 0.5), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lightning_indexer(q, k, w, 0.5), expected, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="lightning_indexer"):
        lightning_indexer(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 6), torch.randn(1, 4, 2), 1.0)


def test_registered_with_reference():
    from loongforge_kernels.plugin import KERNELS

    (k,) = [k for k in KERNELS if k.op == "lightning_indexer"]
    assert k.impl.endswith("dsa:lightning_indexer") and k.reference.endswith("dsa:lightning_indexer_reference")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and tilelang_available()), reason="needs CUDA and tilelang")
@pytest.mark.parametrize("seq_k", [1024, 1000])  # 1000: keys padded to the block
def test_tilelang_indexer_matches_reference(monkeypatch, seq_k):
    """bf16 inputs, fp32 accumulation in both; tolerance: the fp32 reference on the same bf16
    inputs, rtol 1e-2 / atol 1e-2 * max|ref| (tensor-core vs einsum summation order)."""
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "tilelang")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    q = torch.randn(2, 256, 64, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, seq_k, 128, device=dev, dtype=torch.bfloat16)
    w = torch.randn(2, 256, 64, device=dev) * 64**-0.5
    got = lightning_indexer(q, k, w, 128**-0.5)
    ref = lightning_indexer_reference(q, k, w, 128**-0.5)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    # top-k agrees on almost all picks
    top_got, top_ref = got.topk(64, -1).indices, ref.topk(64, -1).indices
    overlap = (top_got.unsqueeze(-1) == top_ref.unsqueeze(-2)).any(-1).float().mean().item()
    assert overlap > 0.95, overlap
