"""FP8 on a GPU (compute capability >= 8.9): the Triton quantisation bit for bit against the torch
references at training shapes, torch's scaled matmul against the dequantised (emulated) GEMM for
every recipe's three GEMMs, and the FP8 linear layer against torchao's Float8Linear as the numerics
reference (tensorwise, rowwise; torchao skipped when not installed)."""

from __future__ import annotations

import pytest
import torch
from loongforge_kernels import fp8
from loongforge_kernels.fp8_linear import (
    RECIPES,
    backward_operands,
    forward_operands,
    fp8_linear,
    scaled_gemm,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)"),
]


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "auto")  # CUDA tensors -> Triton


def _bits(a):
    return a.view(torch.uint8)


@pytest.mark.parametrize(("m", "k"), [(8192, 2048), (4096, 8192), (640, 384)])
def test_triton_quantisation_matches_reference_on_gpu(m, k):
    x = (torch.randn(m, k, device="cuda") * torch.logspace(-2, 2, k, device="cuda")).bfloat16()
    for group in (128, k):
        q, s = fp8.quantize_rows(x, group)
        qr, sr = fp8.quantize_rows_reference(x, group)
        assert torch.equal(s, sr) and torch.equal(_bits(q), _bits(qr)), ("rows", group)
    for group in (128, m):
        q, s = fp8.quantize_cols(x, group)
        qr, sr = fp8.quantize_cols_reference(x, group)
        assert torch.equal(s, sr) and torch.equal(_bits(q), _bits(qr)), ("cols", group)
    scale = fp8.tensor_scale(x, fp8.E5M2)
    q, _ = fp8.quantize_cols(x, m, fp8.E5M2, scale=scale)
    assert torch.equal(_bits(q), _bits(fp8.quantize_cols_reference(x, m, fp8.E5M2, scale=scale)[0]))
    q, s, qt = fp8.quantize_blocks(x, 128, transpose=True)
    qr, sr = fp8.quantize_blocks_reference(x, 128)
    assert torch.equal(s, sr) and torch.equal(_bits(q), _bits(qr)) and torch.equal(_bits(qt), _bits(qr.t().contiguous()))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("m", "n", "k"), [(4096, 2048, 2048), (2048, 384, 640)])
def test_scaled_mm_matches_emulated_gemm(recipe, m, n, k):
    """Every GEMM of the recipe (forward, data and weight gradient) through torch's scaled matmul
    vs dequantise + fp32 matmul (640 = 5 K-blocks: the 128x128 scales' padding to 4)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16()
    dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    a, b, state = forward_operands(recipe, x, w)
    pairs = {"forward": (a, b)}
    pairs["dgrad"], pairs["wgrad"] = backward_operands(recipe, dy, x, w, state)
    for name, (a, b) in pairs.items():
        ours = scaled_gemm(a, b, torch.bfloat16, "scaled_mm").float()
        ref = scaled_gemm(a, b, torch.float32, "emulated")
        rel = float((ours - ref).norm() / ref.norm())
        print(f"{recipe} {name} {m}x{n}x{k}: scaled_mm vs emulated rel {rel:.2e}")
        assert rel < 1e-2, (recipe, name, rel)  # bf16 output rounding: ~4e-3


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_on_gpu_vs_fp32(recipe):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 1024, 2048, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(3072, 2048, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    dy = torch.randn(4, 1024, 3072, device="cuda", generator=g).bfloat16()
    fp8_linear(x, w, recipe).backward(dy)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = xf @ wf.t()
    y.backward(dy.float())
    out = fp8_linear(x.detach(), w.detach(), recipe)
    for name, ours, ref in (("y", out, y.detach()), ("dx", x.grad, xf.grad), ("dw", w.grad, wf.grad)):
        rel = float((ours.float() - ref).norm() / ref.norm())
        print(f"{recipe} {name}: rel error vs fp32 {rel:.4f}")
        assert rel < 0.07, (recipe, name, rel)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_error_within_torchao_reference(recipe):
    """torchao's Float8Linear (same recipe name) as the reference: our error vs the fp32 product
    (output, input and weight gradients) at most 1.5x torchao's (+1e-3)."""
    torchao_float8 = pytest.importorskip("torchao.float8")
    torch.manual_seed(2)
    lin = torch.nn.Linear(2048, 3072, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8192, 3072, device="cuda", dtype=torch.bfloat16)
    xf, wf = x.float().requires_grad_(), lin.weight.detach().float().requires_grad_()
    yf = xf @ wf.t()
    yf.backward(dy.float())
    refs = (yf.detach(), xf.grad, wf.grad)

    def errors(y, dx, dw):
        return [float((t.float() - r).norm() / r.norm()) for t, r in zip((y, dx, dw), refs, strict=True)]

    xx, w = x.clone().requires_grad_(), lin.weight.detach().clone().requires_grad_()
    y = fp8_linear(xx, w, recipe)
    y.backward(dy)
    ours = errors(y, xx.grad, w.grad)

    module = torch.nn.Sequential(torch.nn.Linear(2048, 3072, bias=False, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        module[0].weight.copy_(lin.weight)
    module = torchao_float8.convert_to_float8_training(
        module, config=torchao_float8.Float8LinearConfig.from_recipe_name(recipe))
    xx = x.clone().requires_grad_()
    y = module(xx)
    y.backward(dy)
    theirs = errors(y, xx.grad, module[0].weight.grad)
    print(f"{recipe}: rel errors (y, dx, dw) ours {ours} torchao {theirs}")
    for o, t in zip(ours, theirs, strict=True):
        assert o <= 1.5 * t + 1e-3
