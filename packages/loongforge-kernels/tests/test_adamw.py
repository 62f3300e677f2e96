"""Fused multi-tensor AdamW (Triton; interpreted on CPU) and its reference vs torch.optim.AdamW.

Tolerance vs torch: rtol 1e-6 (8 fp32 ulps) plus 1e-6 x the tensor's max magnitude for entries
that nearly cancel. The kernel does the same operations as torch's single-tensor AdamW with
correctly rounded division and square root, but the compiler (or torch's vectorised CPU lerp) may
fuse a multiply-add, which moves results by an ulp; measured differences are 1-2 ulps. Model
params must equal the kernel's own fp32 params cast by torch, bit for bit (the kernel rounds to
nearest even by bit arithmetic, so this holds in the CPU interpreter too).
"""

import pytest
import torch
from loongforge_kernels.adamw import adamw_step, adamw_step_reference

pytestmark = pytest.mark.usefixtures("triton_path")

SIZES = (1, 37, 4096 + 5, 3 * 4096, 2048)
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.fixture
def impl(request, monkeypatch):
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", request.param)
    return request.param


def _randn(n, seed, device):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


def _state(sizes, device, model_dtype=torch.bfloat16, seed=0):
    params = [_randn(n, seed + i, device) for i, n in enumerate(sizes)]
    zeros = lambda: [torch.zeros(n, device=device) for n in sizes]  # noqa: E731
    model = [torch.empty(n, dtype=model_dtype, device=device) for n in sizes]
    return params, zeros(), zeros(), model


def _close(actual, expected, what):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def _check_vs_torch(params, exp_avgs, exp_avg_sqs, opt, torch_params):
    for i, (p, m, v, tp) in enumerate(zip(params, exp_avgs, exp_avg_sqs, torch_params, strict=True)):
        _close(p, tp.detach(), f"param[{i}]")
        _close(m, opt.state[tp]["exp_avg"], f"exp_avg[{i}]")
        _close(v, opt.state[tp]["exp_avg_sq"], f"exp_avg_sq[{i}]")


@pytest.mark.parametrize("impl", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("scaled", [False, True])
def test_matches_torch_adamw(kt, impl, scaled):
    params, exp_avgs, exp_avg_sqs, model = _state(SIZES, kt.device)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(torch_params, betas=(HYPER["beta1"], HYPER["beta2"]), lr=HYPER["lr"], eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=False, fused=False)
    scale = torch.tensor([2.5], device=kt.device) if scaled else None
    for step in (1, 2, 3):
        grads = [_randn(n, 100 * step + i, kt.device) * (i + 1) for i, n in enumerate(SIZES)]
        before = [g.clone() for g in grads]
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, model, step=step, grad_scale=scale, **HYPER)
        for tp, g in zip(torch_params, grads, strict=True):
            tp.grad = g / scale if scaled else g.clone()
        opt.step()
        _check_vs_torch(params, exp_avgs, exp_avg_sqs, opt, torch_params)
        for i, (g, g0) in enumerate(zip(grads, before, strict=True)):
            assert torch.equal(g, g0), f"grads[{i}] was modified"
        for i, (mp, p) in enumerate(zip(model, params, strict=True)):
            assert torch.equal(mp, p.to(torch.bfloat16)), f"model_params[{i}] != params[{i}].to(bf16)"


@pytest.mark.parametrize("impl", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
def test_other_model_dtypes_and_none(kt, impl, model_dtype):
    """fp32/fp16 model copies; None entries are skipped, the others still written."""
    params, exp_avgs, exp_avg_sqs, model = _state(SIZES, kt.device, model_dtype)
    ref = [p.clone() for p in params], [m.clone() for m in exp_avgs], [v.clone() for v in exp_avg_sqs]
    model[1] = model[3] = None
    grads = [_randn(n, 7 + i, kt.device) for i, n in enumerate(SIZES)]
    adamw_step(params, grads, exp_avgs, exp_avg_sqs, model, step=1, **HYPER)
    adamw_step_reference(ref[0], grads, ref[1], ref[2], [None] * len(SIZES), step=1, **HYPER)
    for i, mp in enumerate(model):
        _close(params[i], ref[0][i], f"param[{i}]")
        if mp is not None:
            assert torch.equal(mp, params[i].to(model_dtype)), f"model_params[{i}]"
    # no model params at all
    adamw_step(params, grads, exp_avgs, exp_avg_sqs, [None] * len(SIZES), step=2, **HYPER)
    adamw_step_reference(ref[0], grads, ref[1], ref[2], [None] * len(SIZES), step=2, **HYPER)
    for i in range(len(SIZES)):
        _close(params[i], ref[0][i], f"param[{i}] (step 2)")


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
def test_bf16_rounds_to_nearest_even(kt, impl):
    """lr = 0 leaves params as they are, so the model copy shows the cast alone: ties, subnormals,
    overflow to inf, inf and NaN as torch's cast gives them."""
    one_ulp = 2.0**-7
    values = torch.tensor([1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, -(1.0 + one_ulp / 2), 1.0 + one_ulp / 2 + 2.0**-20,
                           3.4e38, torch.finfo(torch.float32).max, float("inf"), -float("inf"), 1e-40, -3e-39,
                           0.0, -0.0, 2.0**-133, 65504.5, float("nan")], device=kt.device)
    params = [values.clone()]
    model = [torch.empty_like(values, dtype=torch.bfloat16)]
    zeros = [torch.zeros_like(values) for _ in range(3)]
    adamw_step(params, [zeros[0]], [zeros[1]], [zeros[2]], model, lr=0.0, beta1=0.9, beta2=0.95, eps=1e-8,
               weight_decay=0.0, step=1)
    expect = values.to(torch.bfloat16)
    assert torch.equal(params[0][:-1], values[:-1]) and params[0][-1].isnan()
    assert torch.equal(model[0][:-1].view(torch.int16), expect[:-1].view(torch.int16))
    assert model[0][-1].isnan()


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
def test_cache_follows_the_tensor_lists(kt, impl):
    from loongforge_kernels._triton import adamw as kernels

    kernels._TABLES.clear()
    a = _state(SIZES, kt.device)
    b = _state((4096 * 2 + 1, 5), kt.device, seed=50)
    grads_a = [torch.empty_like(p) for p in a[0]]
    grads_b = [torch.empty_like(p) for p in b[0]]
    for state, grads, n_tables in ((a, grads_a, 1), (b, grads_b, 2), (a, grads_a, 2)):
        ref = [[t.clone() for t in lst] for lst in state[:3]]
        for i, g in enumerate(grads):  # persistent grad buffers, as megatron's main_grad
            g.copy_(_randn(g.numel(), n_tables + i, kt.device))
        adamw_step(state[0], grads, state[1], state[2], state[3], step=1, **HYPER)
        adamw_step_reference(ref[0], grads, ref[1], ref[2], [None] * len(grads), step=1, **HYPER)
        assert len(kernels._TABLES) == n_tables
        for i in range(len(grads)):
            _close(state[0][i], ref[0][i], f"param[{i}]")
            _close(state[1][i], ref[1][i], f"exp_avg[{i}]")
            _close(state[2][i], ref[2][i], f"exp_avg_sq[{i}]")
            assert torch.equal(state[3][i], state[0][i].to(torch.bfloat16))


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
def test_unaligned_views(kt, impl):
    """Views at odd element offsets (slices of a packed grad buffer, say) are fine."""
    sizes = (4096 + 3, 10)
    flat = _randn(sum(sizes) + 1, 9, kt.device)
    grads = list(flat[1:].split(sizes))
    params, exp_avgs, exp_avg_sqs, model = _state(sizes, kt.device)
    ref = [p.clone() for p in params], [m.clone() for m in exp_avgs], [v.clone() for v in exp_avg_sqs]
    for step in (1, 2):
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, model, step=step, **HYPER)
        adamw_step_reference(ref[0], grads, ref[1], ref[2], [None, None], step=step, **HYPER)
    for i in range(len(sizes)):
        _close(params[i], ref[0][i], f"param[{i}]")
        _close(exp_avg_sqs[i], ref[2][i], f"exp_avg_sq[{i}]")
        assert torch.equal(model[i], params[i].to(torch.bfloat16))


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
def test_rejects_bad_inputs(kt, impl):
    from loongforge_kernels._triton import adamw as kernels

    kernels._TABLES.clear()
    params, exp_avgs, exp_avg_sqs, model = _state((8, 4), kt.device)
    grads = [torch.zeros(8, device=kt.device), torch.zeros(4, dtype=torch.bfloat16, device=kt.device)]
    with pytest.raises(ValueError, match=r"grad\[1\]"):
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, model, step=1, **HYPER)
    grads = [torch.zeros(8, device=kt.device), torch.zeros(4, device=kt.device)]
    with pytest.raises(ValueError, match="mix"):
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, [model[0], model[1].half()], step=1, **HYPER)
    with pytest.raises(ValueError, match="different lengths"):
        adamw_step(params, grads[:1], exp_avgs, exp_avg_sqs, model, step=1, **HYPER)
    with pytest.raises(ValueError, match="grad_scale"):
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, model, step=1, grad_scale=torch.ones(2, device=kt.device),
                   **HYPER)
    assert not kernels._TABLES


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    """auto dispatch sends CPU tensors to the reference: no tables built, torch's numbers exactly."""
    from loongforge_kernels._triton import adamw as kernels

    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "auto")
    kernels._TABLES.clear()
    params, exp_avgs, exp_avg_sqs, model = _state(SIZES, torch.device("cpu"))
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(torch_params, betas=(HYPER["beta1"], HYPER["beta2"]), lr=HYPER["lr"], eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=False, fused=False)
    grads = [_randn(n, i, "cpu") for i, n in enumerate(SIZES)]
    adamw_step(params, grads, exp_avgs, exp_avg_sqs, model, step=1, **HYPER)
    for tp, g in zip(torch_params, grads, strict=True):
        tp.grad = g.clone()
    opt.step()
    assert not kernels._TABLES
    for p, m, tp in zip(params, exp_avgs, torch_params, strict=True):
        assert torch.equal(p, tp.detach()) and torch.equal(m, opt.state[tp]["exp_avg"])
