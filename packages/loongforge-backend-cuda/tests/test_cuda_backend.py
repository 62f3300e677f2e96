"""The CUDA backend's choices, on CPU: which kernels run (``kernels.disable``), which SDPA kernel
wins, and that the fused layer spec computes the same model as the plain local spec.

The model test runs the Triton kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1`` is set
by the repository's root conftest before triton is imported) through the layer spec, the RoPE
patch and the LM-head output processor, against megatron-core's own modules, in fp32.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import yaml
from loongforge.config import ConfigError
from loongforge.registry import Kernel
from loongforge_cuda import modules
from loongforge_cuda.attention import choose_fastest
from loongforge_cuda.backend import CudaBackend
from loongforge_cuda.kernels import select_kernels
from loongforge_kernels.plugin import KERNELS

CONFIGS = Path(__file__).resolve().parents[2] / "loongforge-models-llm/src/loongforge_llm/configs/models"


def _k(name, op, devices=("cuda",)):
    return Kernel(name=name, op=op, impl="math:sqrt", reference="math:sqrt", device_types=devices)


def test_select_kernels_disable_by_name_or_op():
    ks = [_k("a_norm", "rmsnorm"), _k("b_norm", "rmsnorm"), _k("glu", "swiglu"), _k("x", "rope", ("xpu",))]
    assert {op: k.name for op, k in select_kernels(ks).items()} == {"rmsnorm": "a_norm", "swiglu": "glu"}
    assert {op: k.name for op, k in select_kernels(ks, ["a_norm"]).items()} == {"rmsnorm": "b_norm", "swiglu": "glu"}
    assert set(select_kernels(ks, ["rmsnorm", "swiglu"])) == set()
    assert set(select_kernels(ks, device_type="xpu")) == {"rope"}


def test_unknown_disable_entry_names_the_config_key():
    with pytest.raises(ConfigError, match=r"kernels\.disable.*'rms_norm'"):
        select_kernels(KERNELS, ["rms_norm"])


def test_registered_kernels_cover_the_backend_ops():
    backend = CudaBackend()
    backend.configure_kernels(KERNELS, ["triton_swiglu"])
    assert set(backend.kernels) == {"rmsnorm", "add_rmsnorm", "rope", "qkv_rope", "flash_attention", "fused_linear_cross_entropy",
                                   "adamw_step", "lightning_indexer", "sparse_mla_forward"}
    assert backend.kernel("swiglu") is None
    from loongforge_kernels.rmsnorm import rms_norm

    assert backend.kernel("rmsnorm") is rms_norm


def test_choose_fastest_skips_unsupported_and_keeps_first_of_ties():
    times = {"cudnn": 2.0, "flash": 1.0, "efficient": 1.0}

    def time_fn(c):
        if c == "math":
            raise RuntimeError("No available kernel.\nmore")
        return times[c]

    best, report = choose_fastest(["cudnn", "math", "flash", "efficient"], time_fn)
    assert best == "flash"
    assert report["math"].startswith("unsupported: No available kernel.")
    assert report["cudnn"] == 2.0
    best, report = choose_fastest(["math"], time_fn)
    assert best is None and set(report) == {"math"}


def test_registered_attention_kernels_join_the_candidates():
    from loongforge_cuda.attention import MeasuredSDPAttention, sdpa

    assert MeasuredSDPAttention.with_kernels({"triton": None}) is MeasuredSDPAttention
    calls = []

    def kernel(q, k, v, causal, scale):
        calls.append((causal, scale))
        return q

    cls = MeasuredSDPAttention.with_kernels({"triton": kernel})
    assert issubclass(cls, MeasuredSDPAttention) and cls.kernels == {"triton": kernel}
    assert MeasuredSDPAttention.kernels == {}
    q = torch.randn(1, 2, 4, 8)
    assert sdpa(q, q, q, None, True, 0.5, 0.0, "triton", False, cls.kernels) is q and calls == [(True, 0.5)]
    with pytest.raises(RuntimeError, match="no attention mask"):
        sdpa(q, q, q, torch.ones(4, 4, dtype=torch.bool), True, 0.5, 0.0, "triton", False, cls.kernels)
    torch.testing.assert_close(sdpa(q, q, q, None, True, 0.5, 0.0, None, False, cls.kernels),
                               torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5))
    backend = CudaBackend()
    backend.configure_kernels(KERNELS)
    from loongforge_kernels.flash_attention import flash_attention_triton

    assert backend.kernel("flash_attention") is flash_attention_triton


def test_rope_tables_computed_once_per_angle_tensor():
    freqs = torch.randn(8, 1, 1, 4)
    cos, sin = modules.rope_tables(freqs, torch.bfloat16)
    torch.testing.assert_close(cos, freqs.cos().bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(sin, freqs.sin().bfloat16(), rtol=0, atol=0)
    again = modules.rope_tables(freqs, torch.bfloat16)
    assert again[0] is cos and again[1] is sin  # q and k of every layer share one computation
    assert modules.rope_tables(freqs, torch.float32)[0].dtype == torch.float32
    freqs.mul_(2)  # changed in place: recomputed
    torch.testing.assert_close(modules.rope_tables(freqs, torch.float32)[0], freqs.cos(), rtol=0, atol=0)
    other = freqs.clone()
    assert modules.rope_tables(other, torch.float32)[0] is not modules.rope_tables(freqs, torch.float32)[0]


def test_rope_patch_is_undone():
    from megatron.core.transformer import attention as mattn

    original = mattn.apply_rotary_pos_emb
    with modules.rope_patch(lambda: None):
        assert mattn.apply_rotary_pos_emb is not original
        with modules.rope_patch(lambda: None):  # nested: no second layer
            inner = mattn.apply_rotary_pos_emb
        assert mattn.apply_rotary_pos_emb is inner
    assert mattn.apply_rotary_pos_emb is original


def _tiny(name="llama3/llama3_tiny"):
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def mcore():
    from loongforge.testing import single_process_megatron

    with single_process_megatron() as backend:
        yield backend


def _build(provider, backend, run):
    config = provider.transformer_config(run)
    torch.manual_seed(0)
    return provider.build(config, run, backend=backend), config


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's CPU interpreter")
@pytest.mark.parametrize("name", ["llama3/llama3_tiny", "qwen3/qwen3_tiny"])
def test_fused_spec_matches_local_spec(mcore, monkeypatch, name):
    """Same weights, same tokens: loss and every gradient agree with megatron's own modules (fp32)."""
    from loongforge.model_provider import RunSettings
    from loongforge_llm.provider import LLMProvider

    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")  # run the Triton kernels (interpreted)
    provider = LLMProvider(_tiny(name))
    run = RunSettings(seq_length=16)
    plain, _ = _build(provider, mcore, run)
    cuda = CudaBackend()
    cuda.configure_kernels(KERNELS)
    fused, config = _build(provider, cuda, run)
    kinds = {type(m).__name__ for m in fused.modules()}
    assert {"FusedRMSNorm", "FusedSwiGLUMLP", "MeasuredSDPAttention", "FusedResidualNormLayer",
            "QKVRoPESelfAttention"} <= kinds
    fused.load_state_dict(plain.state_dict())  # same parameter names: mappings/checkpoints unchanged

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, provider.args.vocab_size, (2, 17), generator=g)
    calls = []
    rope = cuda.kernel("rope")
    processor = fused.output_processor  # installed by the provider from the backend
    assert processor is not None and plain.output_processor is None
    fused.output_processor = lambda **kw: calls.append("ce") or processor(**kw)
    with modules.rope_patch(lambda: (lambda *a: calls.append("rope") or rope(*a))):
        loss_fused = fused(tokens[:, :-1], None, None, labels=tokens[:, 1:])
    loss_plain = plain(tokens[:, :-1], None, None, labels=tokens[:, 1:])
    # q/k RoPE runs inside the fused-QKV kernel instead (test_qkv_rope.py)
    expected = {"ce"} if "QKVRoPESelfAttention" in kinds else {"rope", "ce"}
    assert expected <= set(calls), f"fused pieces that ran: {set(calls)}"
    assert loss_fused.shape == loss_plain.shape == (2, 16)
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-5)
    weights = torch.rand(loss_plain.shape, generator=g)  # a non-uniform upstream gradient
    (loss_fused * weights).sum().backward()
    (loss_plain * weights).sum().backward()
    for (n, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        rel = (p.grad - q.grad).norm() / q.grad.norm()
        assert rel < 1e-5, f"{name}: grad of {n} differs, rel err {rel:.2e}"


def test_disabled_kernels_leave_megatron_modules(mcore):
    from loongforge.model_provider import RunSettings
    from loongforge_llm.provider import LLMProvider

    provider = LLMProvider(_tiny())
    cuda = CudaBackend()
    cuda.configure_kernels(KERNELS, ["rmsnorm", "swiglu", "fused_linear_cross_entropy"])
    model, config = _build(provider, cuda, RunSettings(seq_length=16))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FusedRMSNorm" not in kinds and "FusedSwiGLUMLP" not in kinds and "RMSNorm" in kinds
    assert cuda.output_processor(config) is None and model.output_processor is None


def test_bench_smoke_run_on_cpu(tmp_path):
    """bench/llm_step.py's code path (provider, CUDA layer spec, megatron DDP + optimizer, HF row)
    runs end to end; with and without the fused kernels it trains the same model."""
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[3] / "bench" / "llm_step.py"
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(bench), "--device", "cpu", "--model", "llama3/llama3_tiny", "--seq", "16",
                    "--steps", "2", "--warmup", "1", "--rows", "ours,ours:nokernels,hf", "--json", str(out)],
                   check=True, capture_output=True, text=True)
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    assert all("error" not in r for r in rows.values()), rows
    assert abs(rows["ours"]["loss"][0] - rows["ours:nokernels"]["loss"][0]) < 1e-2
    assert rows["ours"]["flops_token"] == rows["hf"]["flops_token"] > 0

