"""FP8 quantisation kernels against their torch references (bit for bit: scales and fp8 values),
the scaled GEMM's layouts and CPU kernels, and the FP8 linear layer's numerics per recipe.
On CPU the Triton kernels run in the interpreter (LOONGFORGE_KERNELS_IMPL=triton)."""

from __future__ import annotations

import pytest
import torch
from loongforge_kernels import fp8
from loongforge_kernels.fp8_linear import (
    RECIPES,
    Operand,
    dequantize,
    fp8_linear,
    scaled_gemm,
    scaled_mm_args,
    supports,
)

pytestmark = pytest.mark.usefixtures("triton_path")


@pytest.fixture
def triton_impl(monkeypatch):
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _input(kt, m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)  # columns of very different range
    x[0, :7] = 0.0
    x[1] = 0.0  # an all-zero row: amax clamps to 1e-12
    x[2, 0] = 1e-9  # far below the fp8 range after scaling: subnormals / zero
    return x.to(device=kt.device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k", "group"), [(40, 256, 128), (40, 256, 256), (7, 96, 32), (3, 48, 48)])
@pytest.mark.parametrize("fp8_dtype", [fp8.E4M3, fp8.E5M2])
def test_quantize_rows_matches_reference(kt, triton_impl, dtype, m, k, group, fp8_dtype):
    x = _input(kt, m, k, dtype)
    q, s = fp8.quantize_rows(x, group, fp8_dtype)
    q_ref, s_ref = fp8.quantize_rows_reference(x.cpu(), group, fp8_dtype)
    assert s.shape == (m, k // group) and s.dtype == torch.float32
    assert torch.equal(s.cpu(), s_ref)
    assert _bits_equal(q.cpu(), q_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k", "group"), [(256, 40, 128), (256, 40, 256), (64, 7, 64), (96, 24, 32),
                                               (2048, 16, 2048)])  # the last: per-column scales by reduction
def test_quantize_cols_is_transposed_rows(kt, triton_impl, dtype, m, k, group):
    x = _input(kt, m, k, dtype, seed=1)
    q, s = fp8.quantize_cols(x, group)
    q_ref, s_ref = fp8.quantize_rows_reference(x.cpu().t().contiguous(), group)
    assert q.shape == (k, m) and q.is_contiguous() and s.shape == (k, m // group)
    assert torch.equal(s.cpu(), s_ref)
    assert _bits_equal(q.cpu(), q_ref)


@pytest.mark.parametrize("fp8_dtype", [fp8.E4M3, fp8.E5M2])
def test_tensorwise_given_scale(kt, triton_impl, fp8_dtype):
    x = _input(kt, 32, 64, torch.bfloat16, seed=2)
    scale = fp8.tensor_scale(x, fp8_dtype)
    assert scale.shape == (1,) and float(scale) == pytest.approx(fp8.fp8_max(fp8_dtype) / float(x.abs().max()))
    for fn, ref in ((fp8.quantize_rows, fp8.quantize_rows_reference), (fp8.quantize_cols, fp8.quantize_cols_reference)):
        group = 64 if fn is fp8.quantize_rows else 32
        q, s = fn(x, group, fp8_dtype, scale=scale)
        q_ref, s_ref = ref(x.cpu(), group, fp8_dtype, scale=scale.cpu())
        assert s.dim() == 0 and torch.equal(s.cpu(), s_ref)
        assert _bits_equal(q.cpu(), q_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_blocks_and_transpose(kt, triton_impl, dtype):
    w = _input(kt, 256, 384, dtype, seed=3)
    q, s, qt = fp8.quantize_blocks(w, 128, transpose=True)
    q_ref, s_ref = fp8.quantize_blocks_reference(w.cpu(), 128)
    assert s.shape == (2, 3) and torch.equal(s.cpu(), s_ref)
    assert _bits_equal(q.cpu(), q_ref) and _bits_equal(qt.cpu(), q_ref.t().contiguous())


def test_reference_rounding_and_saturation():
    """The reference's fp8 values are the nearest (ties to even) to x * scale, and the group's
    largest magnitude maps to the format's largest value; dequantised error within half an fp8 step."""
    x = torch.tensor([[448.0, 84.0, -124.29, 1.0, 0.0, -448.0, 3.0, 2e-3]])
    q, s = fp8.quantize_rows_reference(x, 8)
    assert float(s) == 1.0
    assert q.float().tolist() == [[448.0, 80.0, -128.0, 1.0, 0.0, -448.0, 3.0, 0.001953125]]
    y = torch.randn(64, 128) * 10
    q, s = fp8.quantize_rows_reference(y, 128)
    assert q.float().abs().amax(dim=1).eq(448.0).all()
    rel = ((q.float() * s - y).abs() / y.abs().clamp_min(1e-3)).max()
    assert rel <= 2.0**-4 + 1e-6 or (q.float() * s - y).abs().max() < 1e-2


def test_scaled_mm_layouts_for_blockwise():
    """The scale layouts torch's scaled matmul documents: 1x128 outer-dim-major, 128x128 padded
    to 4 K-blocks and transposed, b column-major."""
    x, w = torch.randn(256, 640), torch.randn(384, 640)
    xq, xs = fp8.quantize_rows_reference(x, 128)
    wq, ws = fp8.quantize_blocks_reference(w, 128)
    args = scaled_mm_args(Operand(xq, xs, "1x128"), Operand(wq, ws, "128x128"))
    assert args["mat_a"].stride() == (640, 1) and args["mat_b"].stride() == (1, 640)
    assert args["scale_a"].shape == (256, 5) and args["scale_a"].stride() == (1, 256)
    assert args["scale_b"].shape == (8, 3) and args["scale_b"].stride() == (1, 8)  # 5 K-blocks padded to 8
    assert torch.equal(args["scale_b"][:5], ws.t()) and bool((args["scale_b"][5:] == 1).all())
    out = torch.nn.functional.scaled_mm(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v
                                           for k, v in args.items()}, output_dtype=torch.bfloat16)
    assert out.shape == (256, 384)


@pytest.mark.parametrize("kind", ["tensor", "row"])
def test_emulated_gemm_matches_torch_scaled_mm_on_cpu(kind):
    """torch's CPU scaled matmul covers tensorwise and rowwise: the emulated reference agrees."""
    a, b = torch.randn(32, 64), torch.randn(48, 64)
    if kind == "tensor":
        (aq, as_), (bq, bs) = (fp8.quantize_rows_reference(t, 64, scale=fp8.tensor_scale(t)) for t in (a, b))
    else:
        (aq, as_), (bq, bs) = (fp8.quantize_rows_reference(t, 64) for t in (a, b))
    ops = Operand(aq, as_, kind), Operand(bq, bs, kind)
    ours = scaled_gemm(*ops, torch.float32, impl="emulated")
    torch_cpu = scaled_gemm(*ops, torch.float32, impl="scaled_mm")
    torch.testing.assert_close(ours, torch_cpu, rtol=1e-5, atol=1e-4)
    assert (ours - a @ b.t()).norm() / (a @ b.t()).norm() < 0.08  # fp8 quantisation error


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_numerics_and_triton_path(kt, monkeypatch, recipe):
    """Forward, data and weight gradient within fp8 error of the fp32 product; the Triton
    quantisation path gives bit-identical results to the torch one."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 128, 256, generator=g).to(torch.bfloat16)
    w = (torch.randn(384, 256, generator=g) * 0.05).to(torch.bfloat16)
    dy = torch.randn(2, 128, 384, generator=g).to(torch.bfloat16)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    (xf @ wf.t()).backward(dy.float())
    results = {}
    for impl in ("reference", "triton"):
        monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", impl)
        xl, wl = kt.leaf(x), kt.leaf(w)
        y = fp8_linear(xl, wl, recipe, impl="emulated")
        y.backward(dy.to(kt.device))
        results[impl] = [t.detach().cpu() for t in (y, xl.grad, wl.grad)]
        assert y.dtype == wl.grad.dtype == xl.grad.dtype == torch.bfloat16
    for a, b in zip(*results.values(), strict=True):
        assert torch.equal(a, b)
    y, gx, gw = results["triton"]
    for ours, ref in ((y, (xf @ wf.t()).detach()), (gx, xf.grad), (gw, wf.grad)):
        rel = (ours.float() - ref).norm() / ref.norm()
        assert rel < 0.07, (recipe, float(rel))


def test_fp8_linear_accumulates_into_main_grad():
    x = torch.randn(128, 128).to(torch.bfloat16).requires_grad_()
    w = torch.randn(128, 128).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(128, 128).to(torch.bfloat16)
    w.main_grad = torch.ones(128, 128)
    w.grad_added_to_main_grad = False
    fp8_linear(x, w, "rowwise", impl="emulated", accumulate_wgrad=True).backward(dy)
    assert w.grad_added_to_main_grad is True
    w2 = w.detach().clone().requires_grad_()
    fp8_linear(x.detach(), w2, "rowwise", impl="emulated").backward(dy)
    torch.testing.assert_close(w.main_grad, 1 + w2.grad.float(), rtol=1e-2, atol=0.5)


def test_supports():
    assert supports("blockwise", 4096, 2048, 8192) and not supports("blockwise", 4096, 2048, 8200)
    assert supports("rowwise", 16, 32, 48) and not supports("tensorwise", 16, 32, 40)


def test_dequantize_kinds():
    q = torch.ones(256, 256).to(fp8.E4M3)
    s = torch.arange(4, dtype=torch.float32).reshape(2, 2) + 1
    d = dequantize(Operand(q, s, "128x128"))
    assert d[0, 0] == 1 and d[0, 200] == 2 and d[200, 0] == 3 and d[255, 255] == 4
