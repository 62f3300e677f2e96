"""The env switch that picks the Triton path or the reference."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from loongforge_kernels import _dispatch


def test_modes(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv(_dispatch.ENV_IMPL, "reference")
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv(_dispatch.ENV_IMPL, "auto")
    assert _dispatch.use_triton(x) == (x.is_cuda and _dispatch.triton_available())  # CPU tensor: reference
    monkeypatch.setenv(_dispatch.ENV_IMPL, "bogus")
    with pytest.raises(ValueError):
        _dispatch.use_triton(x)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_IMPL, "triton")
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.use_triton(torch.zeros(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.use_triton(torch.zeros(2))


def test_next_pow2():
    assert [_dispatch.next_pow2(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]


def test_interpreter_switched_on_too_late_fails_with_the_cause():
    """triton imported before TRITON_INTERPRET=1 (as megatron.core does): a clear error, not
    Triton's "Cannot call @triton.jit'd outside of the scope of a kernel"."""
    code = textwrap.dedent(
        """
        import os, torch, triton
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["LOONGFORGE_KERNELS_IMPL"] = "triton"
        from loongforge_kernels.rmsnorm import rms_norm
        rms_norm(torch.randn(2, 8), torch.randn(8))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1 was set after triton had been imported" in proc.stderr, proc.stderr[-2000:]
