"""The residual adds + following RMSNorms in one kernel (``loongforge_cuda.residual_norm``) through
the CUDA backend's layer spec: on == off (``kernels.disable=[add_rmsnorm]``: megatron's
bias-dropout-add and norm modules) for logits and every gradient in fp32; the kernel runs once per
layer (attention residual + pre-MLP norm), twice once the layers are linked to the norm after them
(MLP residual + next input norm / final norm), and hidden dropout while training takes megatron's
forward."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers (pytest imports tests by path)
from test_qkv_rope import CountingBackend, _build, _run, needs_triton  # noqa: E402


class AddNormCounting(CountingBackend):
    def __init__(self, disable=()):
        super().__init__(disable)
        self.calls["add_rmsnorm"] = 0


@pytest.fixture(scope="module")
def mcore():
    from loongforge.testing import single_process_megatron

    with single_process_megatron() as backend:
        yield backend


def _on_off(name, linked=False, **build):
    from loongforge_cuda.residual_norm import link_residual_norms

    on, off = AddNormCounting(), AddNormCounting(["add_rmsnorm"])
    fused, provider, config = _build(name, on, **build)
    plain, _, _ = _build(name, off, **build)
    if linked:
        link_residual_norms([fused, plain])  # the plain model has no fused layers: unchanged
    fused.load_state_dict(plain.state_dict())  # same parameter names
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, provider.args.vocab_size, (2, 16), generator=g)
    weights = torch.rand(2, 16, fused.vocab_size, generator=g)
    (logits_on, grads_on), (logits_off, grads_off) = (_run(fused, on, tokens, weights=weights),
                                                      _run(plain, off, tokens, weights=weights))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    errs = {"logits": rel(logits_on, logits_off), **{n: rel(grads_on[n], grads_off[n]) for n in grads_off}}
    return fused, plain, on.calls["add_rmsnorm"], off.calls["add_rmsnorm"], errs, config


@needs_triton
@pytest.mark.parametrize("linked", [False, True], ids=["within-layer", "linked"])
@pytest.mark.parametrize("name", ["llama3/llama3_tiny", "qwen3/qwen3_tiny"])
def test_fused_residual_norm_matches_megatron(mcore, monkeypatch, name, linked):
    from loongforge_cuda.modules import FusedRMSNorm

    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    fused, plain, calls_on, calls_off, errs, config = _on_off(name, linked)
    assert {type(layer).__name__ for layer in fused.decoder.layers} == {"FusedResidualNormLayer"}
    assert {type(layer).__name__ for layer in plain.decoder.layers} == {"TransformerLayer"}
    assert (calls_on, calls_off) == ((2 if linked else 1) * config.num_layers, 0)
    bad = {n: e for n, e in errs.items() if not e < 1e-5}
    assert not bad, f"rel err >= 1e-5: {bad}"
    # every handed-over norm was taken by the norm it was meant for: nothing left behind
    assert all(m.handoff is None for m in fused.modules() if isinstance(m, FusedRMSNorm))
    assert fused.state_dict().keys() == plain.state_dict().keys()


@needs_triton
def test_hidden_dropout_in_training_takes_megatrons_forward(mcore, monkeypatch):
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    backend = AddNormCounting()
    model, provider, _ = _build("llama3/llama3_tiny", backend,
                                overrides={"transformer_config": {"hidden_dropout": 0.1}})
    tokens = torch.randint(0, provider.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    _run(model, backend, tokens, weights=torch.ones(()))
    assert backend.calls["add_rmsnorm"] == 0
    model.eval()  # no dropout in eval: fused again
    with torch.no_grad():
        model(tokens, None, None)
    assert backend.calls["add_rmsnorm"] == len(model.decoder.layers)
