"""Dao-AILab flash-attention as attention candidates, on CPU: which generations count as installed,
what the plugin registers for them, the [b, h, s, d] <-> [b, s, h, d] adapter and its errors, and
that the backend's layer spec times them with the other attention kernels.

The adapter test runs a flash-attention stand-in with the libraries' calling convention
(``flash_attn_func(q, k, v, softmax_scale=, causal=)`` on [b, s, h, d], grouped KV heads, an
``(out, lse)`` result) computed by torch's SDPA; the real kernels are compared on the GPU
(test_flash_attn_gpu.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from loongforge.registry import load_object
from loongforge_cuda import flash_attn, plugin
from loongforge_cuda.attention import MeasuredSDPAttention
from loongforge_cuda.backend import CudaBackend
from loongforge_kernels.plugin import KERNELS
from megatron.core.transformer.spec_utils import ModuleSpec


@pytest.fixture
def only_fa3(monkeypatch):
    monkeypatch.setattr(flash_attn, "_importable", lambda module: module == "flash_attn_interface")


def test_installed_follows_the_importable_modules(only_fa3, monkeypatch):
    assert flash_attn.installed() == ["flash_attn3"]
    monkeypatch.setattr(flash_attn, "_importable", lambda module: False)
    assert flash_attn.installed() == []


def test_importable_is_false_for_a_missing_parent_package():
    assert flash_attn._importable("loongforge_no_such_package.cute") is False


def test_plugin_registers_one_kernel_per_installed_generation(only_fa3):
    kernels = plugin.loongforge_register_kernels()
    assert [(k.name, k.op) for k in kernels] == [("flash_attn3", "flash_attn3")]
    assert load_object(kernels[0].impl) is flash_attn.flash_attn3
    assert load_object(kernels[0].reference) is flash_attn.attention_reference


def _sdpa_in_flash_attn_layout(q, k, v, softmax_scale=None, causal=False):
    """torch's SDPA with the flash-attention calling convention: [b, s, h, d], returns (out, lse)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2), None


def test_adapter_matches_the_reference_on_megatron_layout(monkeypatch):
    monkeypatch.setattr(flash_attn, "_flash_attn_func", lambda name: _sdpa_in_flash_attn_layout)
    g = torch.Generator().manual_seed(0)
    # megatron hands attention [s, b, h, d]; SDPAttention permutes it to [b, h, s, d] views
    q, k, v = (torch.randn(12, 2, n, 16, generator=g).permute(1, 2, 0, 3).bfloat16() for n in (4, 2, 2))
    out = flash_attn.flash_attn4(q, k, v, causal=True, scale=0.3)
    assert out.shape == q.shape
    ref = flash_attn.attention_reference(q.float(), k.float(), v.float(), causal=True, scale=0.3)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_adapter_turns_input_errors_into_runtime_errors(monkeypatch):
    def refuses(q, k, v, softmax_scale=None, causal=False):
        raise AssertionError("head_dim 72 is not supported")

    monkeypatch.setattr(flash_attn, "_flash_attn_func", lambda name: refuses)
    q = torch.randn(1, 2, 8, 72, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="flash_attn2: head_dim 72"):
        flash_attn.flash_attn2(q, q, q)
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        flash_attn.flash_attn2(q.float(), q.float(), q.float())


def test_adapter_reports_an_installed_but_broken_library(monkeypatch):
    def broken(name):
        raise ImportError("libcuda_dialect.so: cannot open shared object file")

    monkeypatch.setattr(flash_attn, "_flash_attn_func", broken)
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="flash_attn4 does not import: libcuda_dialect"):
        flash_attn.flash_attn4(q, q, q)


def _attention_classes(spec):
    """Every MeasuredSDPAttention subclass a layer spec builds."""
    if isinstance(spec, type):
        return [spec] if issubclass(spec, MeasuredSDPAttention) else []
    if isinstance(spec, ModuleSpec):
        return _attention_classes(spec.module) + _attention_classes(spec.submodules)
    if dataclasses.is_dataclass(spec):
        return [c for f in dataclasses.fields(spec) for c in _attention_classes(getattr(spec, f.name))]
    if isinstance(spec, list | tuple):
        return [c for s in spec for c in _attention_classes(s)]
    return []


def test_layer_spec_times_installed_flash_attention(only_fa3):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, normalization="RMSNorm")
    backend = CudaBackend()
    backend.configure_kernels([*KERNELS, *plugin.loongforge_register_kernels()])
    (attention,) = set(_attention_classes(backend.layer_spec(config, None)))
    assert attention.kernels["flash_attn3"] is flash_attn.flash_attn3 and "triton" in attention.kernels

    backend.configure_kernels([*KERNELS, *plugin.loongforge_register_kernels()], ["flash_attn3"])
    (attention,) = set(_attention_classes(backend.layer_spec(config, None)))
    assert "flash_attn3" not in attention.kernels
