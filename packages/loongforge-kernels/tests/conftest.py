"""Shared helpers for the kernel tests.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before
``triton`` is first imported. The repository's root conftest.py does that before any package's
tests are collected (megatron.core imports triton); setting it here too covers running this
directory with another rootdir. It changes nothing for CPU code that does not use Triton.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def assert_parity(fused: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """fused vs reference: tight in fp32; in bf16 within rounding, scaled by the tensor's magnitude
    (intermediate roundings err relative to the terms, not to a small result).

    The CPU interpreter truncates fp32->bf16 (the GPU rounds to nearest even), so bf16 results
    there can differ by a full bf16 ulp.
    """
    assert fused.shape == ref.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref.shape)}"
    assert fused.dtype == ref.dtype, f"{what}: dtype {fused.dtype} != {ref.dtype}"
    scale = ref.detach().abs().max().float().item() if ref.numel() else 0.0
    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-5 * max(scale, 1e-6)
    else:
        rtol, atol = 1.6e-2, 1e-2 * max(scale, 1e-6)
    torch.testing.assert_close(fused.float(), ref.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_fwd_bwd(fn, inputs, grad_out=None, seed=0):
    """Call ``fn(*inputs)``, backprop ``grad_out`` (random if None); -> (out, grads, grad_out)."""
    out = fn(*inputs)
    if grad_out is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads, grad_out


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(DEVICE).requires_grad_(True)


@pytest.fixture
def triton_path():
    """Skip unless the Triton path can run here (compiled on CUDA, interpreted on CPU)."""
    if not HAS_TRITON or (not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs triton (compiled on CUDA, or TRITON_INTERPRET=1 on CPU)")


@pytest.fixture
def kt():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""

    class _Helpers:
        device = DEVICE
        parity = staticmethod(assert_parity)
        fwd_bwd = staticmethod(run_fwd_bwd)
        leaf = staticmethod(leaf)

    return _Helpers


def pytest_collection_modifyitems(config, items):
    """On a CUDA machine the device-parametric kernel tests (``kt`` / ``triton_path``) run the compiled
    kernels on the GPU: mark them ``gpu`` (``loongforge_kernels.testing.mark_device_tests``)."""
    from pathlib import Path

    from loongforge_kernels.testing import mark_device_tests

    mark_device_tests(items, Path(__file__).parent, HAS_CUDA, pytest.mark.gpu)
