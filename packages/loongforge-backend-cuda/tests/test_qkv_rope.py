"""q/k RoPE (with Qwen3's QK-norm) straight from the fused QKV (``loongforge_cuda.qkv_rope``)
through the CUDA backend's layer spec: with the kernel on and off (``kernels.disable=[qkv_rope]``:
megatron's split, its norm modules and the separate RoPE kernel) tiny Qwen3 and Llama models compute
the same logits and gradients, the fused kernel really runs (calls counted) and the cases it does
not cover fall back.

On CPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by the root
conftest); ``test_qkv_rope_gpu.py`` runs the comparison compiled on a GPU, in fp32 and bf16.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import yaml
from loongforge_cuda import modules
from loongforge_cuda.backend import CudaBackend
from loongforge_kernels.plugin import KERNELS

CONFIGS = Path(__file__).resolve().parents[2] / "loongforge-models-llm/src/loongforge_llm/configs/models"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton's CPU interpreter")


class CountingBackend(CudaBackend):
    """The CUDA backend whose ``qkv_rope`` and ``rope`` kernels count their calls."""

    def __init__(self, disable=()):
        super().__init__()
        self.calls = {"qkv_rope": 0, "rope": 0}
        self.configure_kernels(KERNELS, disable)

    def kernel(self, op):
        fn = super().kernel(op)
        if op not in self.calls or fn is None:
            return fn

        def counted(*args):
            self.calls[op] += 1
            return fn(*args)

        return counted


@pytest.fixture(scope="module")
def mcore():
    from loongforge.testing import single_process_megatron

    with single_process_megatron() as backend:
        yield backend


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")  # the Triton kernels, also on CPU tensors


def _build(name, backend, *, seq=16, bf16=False, device="cpu", overrides=None, **run_settings):
    from loongforge.model_provider import RunSettings
    from loongforge_llm.provider import LLMProvider

    provider = LLMProvider({**yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), **(overrides or {})})
    run = RunSettings(seq_length=seq, bf16=bf16, **run_settings)
    config = provider.transformer_config(run)
    torch.manual_seed(0)
    model = provider.build(config, run, backend=backend).to(device)
    return model.to(torch.bfloat16) if bf16 else model, provider, config


def _attention_classes(model):
    return {type(layer.self_attention).__name__ for layer in model.decoder.layers}


def _run(model, backend, tokens, position_ids=None, weights=None):
    """Logits and every parameter's gradient of ``sum(logits * weights)``."""
    model.zero_grad(set_to_none=True)
    with modules.rope_patch(lambda: backend.kernel("rope")):
        logits = model(tokens, position_ids, None)
        (logits.float() * weights).sum().backward()  # activation recompute runs RoPE here again
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _compare(name, extra_disable=(), position_ids=None, seq=16, batch=2, bf16=False, device="cpu", **build):
    """Fused on vs off: -> (models on/off, calls on/off, {logits/each grad: rel err}, config)."""
    on, off = CountingBackend(extra_disable), CountingBackend(["qkv_rope", *extra_disable])
    fused, provider, config = _build(name, on, seq=seq, bf16=bf16, device=device, **build)
    plain, _, _ = _build(name, off, seq=seq, bf16=bf16, device=device, **build)
    fused.load_state_dict(plain.state_dict())  # same parameter names: mappings/checkpoints unchanged
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, provider.args.vocab_size, (batch, seq), generator=g).to(device)
    weights = torch.rand(batch, seq, fused.vocab_size, generator=g).to(device)  # non-uniform upstream grad
    pos = None if position_ids is None else position_ids.to(device)
    logits_on, grads_on = _run(fused, on, tokens, pos, weights)
    logits_off, grads_off = _run(plain, off, tokens, pos, weights)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    errs = {"logits": rel(logits_on, logits_off)}
    errs.update({n: rel(grads_on[n], grads_off[n]) for n in grads_off})
    return fused, plain, on.calls, off.calls, errs, config


def _assert_fused(calls_on, calls_off, layers, passes=1):
    # one fused call per layer (q and k together); off: megatron's RoPE once for q, once for k
    assert calls_on == {"qkv_rope": passes * layers, "rope": 0}, calls_on
    assert calls_off == {"qkv_rope": 0, "rope": 2 * passes * layers}, calls_off


def _assert_close(errs):
    bad = {n: e for n, e in errs.items() if not e < 1e-5}
    assert not bad, f"rel err >= 1e-5: {bad}"


@needs_triton
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("extra_disable", [(), ("rmsnorm",)], ids=["fused-norms", "torch-norms"])
def test_qwen3_fused_qkv_rope_matches_megatron_split_norms_and_rope(mcore, extra_disable):
    """Same weights, same tokens: logits and every gradient agree (fp32) with megatron's split,
    separate q/k norm modules and RoPE, and q/k never go through the separate RoPE."""
    fused, plain, calls_on, calls_off, errs, config = _compare("qwen3/qwen3_tiny", extra_disable)
    assert _attention_classes(fused) == {"QKVRoPESelfAttention"}
    assert _attention_classes(plain) == {"SelfAttention"}
    _assert_fused(calls_on, calls_off, config.num_layers)
    _assert_close(errs)
    # the q/k norm weights stay where they were and receive their gradient through the kernel
    assert {"q_layernorm.weight", "k_layernorm.weight"} <= {
        n.split("self_attention.")[-1] for n in errs if "self_attention." in n}


@needs_triton
@pytest.mark.usefixtures("triton_kernels")
def test_llama_without_qk_norm_is_fused_too(mcore):
    """Llama (grouped KV heads, no QK-norm): RoPE of q and k from the fused QKV, same numbers."""
    fused, _, calls_on, calls_off, errs, config = _compare("llama3/llama3_tiny")
    assert config.num_query_groups < config.num_attention_heads
    assert _attention_classes(fused) == {"QKVRoPESelfAttention"}
    _assert_fused(calls_on, calls_off, config.num_layers)
    _assert_close(errs)


@needs_triton
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("batch", [1, 2])
def test_positions_restarted_per_document_are_fused(mcore, batch):
    """Packed pre-training restarts position ids at each document: the angles are per sample
    (``[s, b, 1, d]``; ``[s, 1, 1, d]`` for one sample). Fused, and equal to the separate path."""
    seq = 16
    rows = [torch.cat([torch.arange(6), torch.arange(seq - 6)]), torch.cat([torch.arange(3), torch.arange(seq - 3)])]
    position_ids = torch.stack(rows[:batch])
    _, _, calls_on, calls_off, errs, config = _compare(
        "qwen3/qwen3_tiny", position_ids=position_ids, seq=seq, batch=batch)
    _assert_fused(calls_on, calls_off, config.num_layers)
    _assert_close(errs)


@needs_triton
@pytest.mark.usefixtures("triton_kernels")
def test_full_recompute_reruns_the_fused_path(mcore):
    """Full activation recompute re-runs each layer's forward in the backward pass: the kernel
    runs again there (twice the calls) and the gradients are unchanged."""
    _, _, calls_on, calls_off, errs, config = _compare(
        "qwen3/qwen3_tiny", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    _assert_fused(calls_on, calls_off, config.num_layers, passes=2)
    _assert_close(errs)


@needs_triton
@pytest.mark.usefixtures("triton_kernels")
def test_layernorm_qk_norm_falls_back(mcore):
    """A LayerNorm QK-norm (weight and bias) is not what the kernel computes: the same attention
    class runs megatron's split, norm modules and RoPE, the very same computation as with the
    kernel off."""
    _, _, calls_on, _, errs, config = _compare(
        "qwen3/qwen3_tiny", overrides={"transformer_config": {"normalization": "LayerNorm"}})
    assert calls_on == {"qkv_rope": 0, "rope": 2 * config.num_layers}, calls_on
    assert max(errs.values()) == 0.0, errs


def test_disable_leaves_megatron_attention(mcore):
    backend = CountingBackend(["triton_qkv_rope"])  # by kernel name, like kernels.disable
    model, _, _ = _build("qwen3/qwen3_tiny", backend)
    assert _attention_classes(model) == {"SelfAttention"}
