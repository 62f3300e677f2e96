"""Chunked linear + cross-entropy (Triton CE pieces; interpreted on CPU) vs the fp32 reference."""

import math

import pytest
import torch
from loongforge_kernels import _matmul
from loongforge_kernels import fused_linear_ce as fce
from loongforge_kernels.fused_linear_ce import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    fused_linear_cross_entropy_triton,
)

pytestmark = pytest.mark.usefixtures("triton_path")


@pytest.fixture(autouse=True)
def _speculating(monkeypatch):
    """Each test starts with reduction="none" speculating (a miss turns it off process-wide)."""
    monkeypatch.setitem(fce.SPECULATE, "on", True)

# V spans several 128-wide column blocks with a ragged last one; N is not a multiple of the chunk.
N, H, V, CHUNK = 37, 24, 300, 16


def _inputs(kt, dtype, n=N, seed=0, ignore_every=5, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = kt.leaf(torch.randn(n, H, generator=g).to(dtype))
    weight = kt.leaf((0.3 * torch.randn(V, H, generator=g)).to(dtype))
    labels = torch.randint(0, V, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = ignore_index
    return hidden, weight, labels.to(kt.device)


def _compare(kt, dtype, hidden, weight, labels, reduction, chunk_size=CHUNK, **kw):
    def fused(h, w):
        return fused_linear_cross_entropy_triton(
            h, w, labels, reduction=reduction, chunk_size=chunk_size, **kw
        )

    def ref(h, w):
        return fused_linear_cross_entropy_reference(h, w, labels, reduction=reduction, **kw)

    out, grads, go = kt.fwd_bwd(fused, [hidden, weight])
    ref_out, ref_grads, _ = kt.fwd_bwd(ref, [hidden, weight], go)
    assert out.dtype == torch.float32
    # The loss is fp32 on both sides; with bf16 operands ours comes from bf16-rounded logits.
    kt.parity(out, ref_out, dtype, "loss")
    kt.parity(grads[0], ref_grads[0], dtype, "dhidden")
    kt.parity(grads[1], ref_grads[1], dtype, "dweight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_fused_ce_matches_reference(kt, dtype, reduction):
    _compare(kt, dtype, *_inputs(kt, dtype), reduction)


@pytest.mark.parametrize("chunk_size", [1, 7, N, 1000])
def test_fused_ce_chunk_sizes(kt, chunk_size):
    _compare(kt, torch.float32, *_inputs(kt, torch.float32, seed=1), "mean", chunk_size=chunk_size)


def test_fused_ce_custom_ignore_index_and_3d_hidden(kt):
    hidden, weight, labels = _inputs(kt, torch.float32, n=2 * 9, seed=2, ignore_every=4, ignore_index=7)
    hidden3d = hidden.detach().view(9, 2, H).requires_grad_(True)
    labels2d = labels.view(9, 2)
    out = fused_linear_cross_entropy_triton(
        hidden3d, weight, labels2d, ignore_index=7, reduction="none", chunk_size=5
    )
    ref = fused_linear_cross_entropy_reference(hidden3d, weight, labels2d, ignore_index=7, reduction="none")
    assert out.shape == (9, 2)
    kt.parity(out, ref, torch.float32, "loss")
    assert torch.all(out[labels2d == 7] == 0)
    _compare(kt, torch.float32, hidden3d, weight, labels2d, "mean", chunk_size=5, ignore_index=7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_ce_all_ignored(kt, reduction):
    hidden, weight, labels = _inputs(kt, torch.float32, n=6, ignore_every=0)
    labels = torch.full_like(labels, -100)
    out = fused_linear_cross_entropy_triton(hidden, weight, labels, reduction=reduction, chunk_size=4)
    ref = fused_linear_cross_entropy_reference(hidden, weight, labels, reduction=reduction)
    if reduction == "mean":  # 0 / 0, like F.cross_entropy
        assert math.isnan(out.item()) and math.isnan(ref.item())
        out = out.nan_to_num()
    else:
        kt.parity(out, ref, torch.float32, "loss")
    dh, dw = torch.autograd.grad(out.sum(), [hidden, weight])
    assert not dh.any() and not dw.any()


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_fused_ce_partial_requires_grad(kt, which):
    hidden, weight, labels = _inputs(kt, torch.float32, seed=4)
    if which == "hidden":
        weight = weight.detach()
    else:
        hidden = hidden.detach()
    for reduction in ("mean", "none"):
        leaf = hidden if which == "hidden" else weight
        out = fused_linear_cross_entropy_triton(hidden, weight, labels, reduction=reduction, chunk_size=CHUNK)
        ref = fused_linear_cross_entropy_reference(hidden, weight, labels, reduction=reduction)
        go = torch.rand_like(out)
        (g,) = torch.autograd.grad(out, [leaf], go)
        (rg,) = torch.autograd.grad(ref, [leaf], go)
        kt.parity(g, rg, torch.float32, f"{which}/{reduction}")


def test_fused_ce_no_grad(kt):
    hidden, weight, labels = _inputs(kt, torch.bfloat16)
    with torch.no_grad():
        out = fused_linear_cross_entropy_triton(hidden, weight, labels, chunk_size=CHUNK)
    assert out.grad_fn is None
    kt.parity(
        out, fused_linear_cross_entropy_reference(hidden, weight, labels).detach(), torch.bfloat16, "loss"
    )


def test_fused_ce_logits_never_exceed_one_chunk(kt, monkeypatch):
    """Every logits matmul is at most chunk x V and the weight gradient is accumulated chunk by
    chunk: no [N, V] ever exists."""
    hidden, weight, labels = _inputs(kt, torch.bfloat16, n=50)
    logits_rows, accumulated_rows = [], []
    real_logits, real_addmm = fce._chunk_logits, _matmul.addmm_f32_

    def chunk_logits(h_c, w):
        logits, lse = real_logits(h_c, w)
        assert logits.shape == (h_c.shape[0], V) and logits.dtype == torch.bfloat16
        logits_rows.append(h_c.shape[0])
        return logits, lse

    def addmm(acc, a, b):
        accumulated_rows.append(a.shape[1])  # the reduced (token) dim is a's second
        return real_addmm(acc, a, b)

    monkeypatch.setattr(fce, "_chunk_logits", chunk_logits)
    monkeypatch.setattr(_matmul, "addmm_f32_", addmm)
    # ceil(50 / 8) chunks; "none" with a per-token gradient recomputes them all in backward
    for reduction, weights, chunks in (("mean", None, 7), ("none", None, 7), ("none", "random", 14)):
        logits_rows.clear(), accumulated_rows.clear()
        out = fused_linear_cross_entropy_triton(hidden, weight, labels, reduction=reduction, chunk_size=8)
        grad_out = torch.ones_like(out) if weights is None else torch.rand_like(out)
        with pytest.warns(UserWarning, match="recomputing") if weights else _no_warning():
            torch.autograd.grad(out, [hidden, weight], grad_out)
        assert len(logits_rows) == chunks and max(logits_rows) == 8, (reduction, weights)
        assert len(accumulated_rows) == chunks and max(accumulated_rows) == 8, (reduction, weights)


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield

    return ctx()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_none_uniform_gradient_uses_forward_gradients(kt, dtype, monkeypatch):
    """A masked-mean style upstream gradient (one value on non-ignored tokens, anything on ignored
    ones): backward only rescales, results match the reference, and speculation stays on."""
    hidden, weight, labels = _inputs(kt, dtype, seed=4)
    grad_out = torch.where(labels != -100, 0.37, torch.randn(labels.shape, device=labels.device))
    recomputed = []
    real = fce._run_chunks
    monkeypatch.setattr(fce, "_run_chunks", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    out, grads, _ = kt.fwd_bwd(
        lambda h, w: fused_linear_cross_entropy_triton(h, w, labels, reduction="none", chunk_size=CHUNK),
        [hidden, weight], grad_out)
    ref_out, ref_grads, _ = kt.fwd_bwd(
        lambda h, w: fused_linear_cross_entropy_reference(h, w, labels, reduction="none"), [hidden, weight], grad_out)
    assert len(recomputed) == 1, "backward recomputed the chunks"
    assert fce.SPECULATE["on"]
    kt.parity(out, ref_out, dtype, "loss")
    kt.parity(grads[0], ref_grads[0], dtype, "dhidden")
    kt.parity(grads[1], ref_grads[1], dtype, "dweight")


def test_fused_ce_none_after_a_miss_stops_speculating(kt):
    hidden, weight, labels = _inputs(kt, torch.float32, seed=5)
    with pytest.warns(UserWarning, match="recomputing"):
        _compare(kt, torch.float32, hidden, weight, labels, "none")  # random per-token gradient: a miss
    assert not fce.SPECULATE["on"]
    _compare(kt, torch.float32, hidden, weight, labels, "none")  # the recomputing path, still exact


def test_default_chunk_size():
    # bf16 chunk logits [8192, V] take twice the bytes of the fp32 [V, 2048] weight-gradient accumulator
    assert default_chunk_size(32768, 2048, 128256) == 8192
    assert default_chunk_size(32768, 1024, 128256, itemsize=4) == 2048
    assert default_chunk_size(1 << 20, 4096, 151936) == 8192  # at most 8192 rows
    assert default_chunk_size(10, 2048, 128256) == 10
    assert default_chunk_size(1 << 20, 32, 1000) == 256  # at least 256 rows


def test_fused_ce_dispatch(kt, monkeypatch):
    hidden, weight, labels = _inputs(kt, torch.float32)
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    assert "FusedLinearCE" in type(fused_linear_cross_entropy(hidden, weight, labels).grad_fn).__name__
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "reference")
    assert "FusedLinearCE" not in type(fused_linear_cross_entropy(hidden, weight, labels).grad_fn).__name__
    with pytest.raises(ValueError):
        fused_linear_cross_entropy_triton(hidden, weight, labels, reduction="avg")


def _fp32_weight_grad(hidden, weight, labels, reduction, grad_out):
    """The reference's fp32 weight gradient (its math on fp32 copies of the operands)."""
    w32 = weight.detach().float().requires_grad_(True)
    out = fused_linear_cross_entropy_reference(hidden.detach().float(), w32, labels, reduction=reduction)
    (dw,) = torch.autograd.grad(out, [w32], grad_out)
    return dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction, upstream", [("none", "uniform"), ("none", "per-token"), ("mean", None),
                                                 ("sum", None)])
def test_fused_ce_weight_grad_into_accumulates_fp32(kt, dtype, reduction, upstream):
    """``weight_grad_into``: backward adds the fp32 weight gradient to the buffer's content and
    gives the weight no gradient; the hidden gradient is unchanged. The reference does the same
    (bit for bit its own fp32 gradient), so tests of callers can use either."""
    hidden, weight, labels = _inputs(kt, dtype, seed=6)
    g = torch.Generator().manual_seed(7)
    if reduction != "none":
        grad_out = torch.tensor(1.7, device=kt.device)
    elif upstream == "uniform":  # a masked mean: backward rescales the forward's gradients
        grad_out = torch.where(labels != -100, 0.03, torch.randn(labels.shape, generator=g).to(kt.device))
    else:  # weighted tokens: backward recomputes the chunks into the buffer
        grad_out = torch.rand(labels.shape, generator=g).to(kt.device)
    prev = (0.1 * torch.randn(V, H, generator=g)).to(kt.device)
    dw32 = _fp32_weight_grad(hidden, weight, labels, reduction, grad_out)
    _, (ref_dh,), _ = kt.fwd_bwd(
        lambda h: fused_linear_cross_entropy_reference(h, weight.detach(), labels, reduction=reduction), [hidden],
        grad_out)

    for fn in (fused_linear_cross_entropy_reference, fused_linear_cross_entropy_triton):
        into = prev.clone()
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        out = fn(h, w, labels, reduction=reduction, chunk_size=CHUNK, weight_grad_into=into)
        recomputes = upstream == "per-token" and fn is fused_linear_cross_entropy_triton
        with pytest.warns(UserWarning, match="recomputing") if recomputes else _no_warning():
            out.backward(grad_out)
        assert w.grad is None, fn.__name__
        kt.parity(h.grad, ref_dh, dtype, f"{fn.__name__} dhidden")
        if fn is fused_linear_cross_entropy_reference:
            assert torch.equal(into, prev + dw32)
        else:
            kt.parity(into - prev, dw32, dtype, "dweight into the buffer")


@pytest.mark.parametrize("speculate", [True, False])
def test_fused_ce_weight_grad_into_tied_with_embedding(kt, speculate, monkeypatch):
    """One weight as embedding table and LM head: the embedding's gradient arrives through
    autograd, the LM head's in the buffer, and together they are the full gradient."""
    monkeypatch.setitem(fce.SPECULATE, "on", speculate)
    hidden, weight, labels = _inputs(kt, torch.float32, seed=8)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(9)).to(kt.device)
    proj = torch.randn(H, H, generator=torch.Generator().manual_seed(10)).to(kt.device) / H**0.5

    def grads(ce, into=None):
        w = weight.detach().requires_grad_(True)
        h = torch.tanh(torch.nn.functional.embedding(ids, w) @ proj) + hidden.detach()
        kw = {} if into is None else {"weight_grad_into": into}
        per_token = ce(h, w, labels, reduction="none", chunk_size=CHUNK, **kw)
        ((per_token * (labels != -100)).sum() / (labels != -100).sum()).backward()
        return w.grad

    full = grads(fused_linear_cross_entropy_reference)
    ref_into = torch.full((V, H), 0.25, device=kt.device)
    ref_embedding = grads(fused_linear_cross_entropy_reference, ref_into)
    into = torch.full((V, H), 0.25, device=kt.device)
    embedding = grads(fused_linear_cross_entropy_triton, into)
    assert (ref_into != 0.25).any() and not torch.allclose(ref_embedding, full)  # the split is real
    kt.parity(embedding, ref_embedding, torch.float32, "embedding gradient")
    kt.parity(into - 0.25, ref_into - 0.25, torch.float32, "LM-head gradient in the buffer")
    kt.parity(embedding + (into - 0.25), full, torch.float32, "embedding + LM-head gradient")


def test_fused_ce_weight_grad_into_checks_the_buffer(kt):
    hidden, weight, labels = _inputs(kt, torch.bfloat16)
    for bad in (torch.zeros(V, H, dtype=torch.bfloat16), torch.zeros(V - 1, H)):
        for fn in (fused_linear_cross_entropy_reference, fused_linear_cross_entropy_triton):
            with pytest.raises(ValueError, match="weight_grad_into"):
                fn(hidden, weight, labels, weight_grad_into=bad.to(kt.device))
