"""DSA lightning indexer: the reference against the definition (CPU) and the TileLang kernel
against the reference (GPU, ``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
from loongforge_kernels.dsa import (
    lightning_indexer,
    lightning_indexer_reference,
    sparse_mla_forward,
    sparse_mla_forward_reference,
    tilelang_available,
)


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

    for op in ("lightning_indexer", "sparse_mla_forward"):
        (k,) = [k for k in KERNELS if k.op == op]
        assert k.impl.endswith(f"dsa:{op}") and k.reference.endswith(f"dsa:{op}_reference")


def test_sparse_mla_reference_matches_definition():
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(2, 4, 3, 10, generator=g), torch.randn(2, 9, 10, generator=g)
    idx = torch.tensor([[[0, -1, -1], [1, 0, -1], [2, 0, 1], [3, 1, 2]]] * 2)
    out, lse = sparse_mla_forward(q, kv, idx, 0.4, dv=6)  # CPU: the reference
    for b in range(2):
        for s in range(4):
            keys = [t for t in idx[b, s].tolist() if t >= 0]
            for h in range(3):
                logits = torch.stack([q[b, s, h] @ kv[b, t] for t in keys]) * 0.4
                p = torch.softmax(logits, 0)
                expected = sum(p[i] * kv[b, t, :6] for i, t in enumerate(keys))
                torch.testing.assert_close(out[b, s, h], expected, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(lse[b, s, h], torch.logsumexp(logits, 0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_mla_forward_reference(q, kv, idx, 0.4, 6)[0], out)


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


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and tilelang_available()), reason="needs CUDA and tilelang")
@pytest.mark.parametrize("topk", [256, 200])  # 200: indices padded with -1 to the block
def test_tilelang_sparse_mla_matches_reference(monkeypatch, topk):
    """DeepSeek-V3.2 absorbed shape (D = 512 + 64, dv = 512), 128 heads, bf16 in/out, fp32 softmax;
    tolerance rtol 2e-2 / atol 2e-2 x max|ref| on out (bf16 P in the second GEMM), 1e-3 on lse."""
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "tilelang")
    torch.manual_seed(0)
    dev, s, t = torch.device("cuda"), 128, 1024
    q = torch.randn(1, s, 128, 576, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, t, 576, device=dev, dtype=torch.bfloat16)
    scores = torch.randn(1, s, t, device=dev)
    q_pos = torch.arange(t - s, t, device=dev)[:, None]  # queries at the end of the keys, causal
    scores = scores.masked_fill(torch.arange(t, device=dev)[None, :] > q_pos, float("-inf"))
    vals, idx = scores.topk(topk, dim=-1)
    idx = torch.where(torch.isfinite(vals), idx, -1)
    idx[:, :4, topk // 2:] = -1  # some queries with fewer keys (valid ones first)
    out, lse = sparse_mla_forward(q, kv, idx, 192**-0.5, 512)
    ref_out, ref_lse = sparse_mla_forward_reference(q, kv, idx, 192**-0.5, 512)
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2 * ref_out.float().abs().max().item())
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
