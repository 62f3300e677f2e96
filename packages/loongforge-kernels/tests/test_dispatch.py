"""The env switch that picks the Triton path or the reference."""

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
