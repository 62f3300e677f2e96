"""FP8 linear layers through the CUDA backend, on CPU: which megatron layers switch (exclude list,
first/last layer, LM head), the loss and gradients within FP8 error of bf16 (emulated scaled GEMMs:
dequantise + matmul), the bf16 fallback for dimensions a recipe does not cover (said once), the
adaptive choice per shape (printed), reversibility, and the refusals naming the key."""

from __future__ import annotations

import pytest
import torch
from loongforge.config import ConfigError
from loongforge.testing import single_process_megatron
from loongforge_cuda import fp8 as cuda_fp8
from loongforge_cuda.fp8 import AdaptiveChooser, FP8ForwardImpl, apply_fp8, check_fp8_config
from loongforge_cuda.wgrad import fuse_wgrad_accumulation, wgrad_accumulation_patch
from omegaconf import OmegaConf

LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def _gpt(layers: int, hidden: int, ffn: int, seq: int):
    from loongforge.modules.layer_spec import local_sdpa_spec
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    config = TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=ffn,
                               bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
                               normalization="RMSNorm", gated_linear_unit=True)
    model = GPTModel(config, local_sdpa_spec(config), vocab_size=128, max_sequence_length=seq)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  Float16Module(config, model))
    fuse_wgrad_accumulation([ddp])
    return ddp


def _step(ddp, tokens):
    b, s = tokens.shape[0], tokens.shape[1] - 1
    ddp.zero_grad_buffer()
    loss = ddp(tokens[:, :-1], torch.arange(s).expand(b, s), None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    return float(loss), {n: p.main_grad.clone() for n, p in ddp.named_parameters()}


@pytest.mark.parametrize(("recipe", "hidden", "ffn", "seq"), [("tensorwise", 64, 128, 16), ("rowwise", 64, 128, 16),
                                                              ("blockwise", 128, 256, 64)])
def test_fp8_layers_train_close_to_bf16_and_are_reversible(recipe, hidden, ffn, seq):
    with single_process_megatron(seed=3), wgrad_accumulation_patch():
        ddp = _gpt(4, hidden, ffn, seq)
        tokens = torch.randint(0, 128, (2, seq + 1), generator=torch.Generator().manual_seed(1))
        ref_loss, ref_grads = _step(ddp, tokens)
        layers = apply_fp8([ddp], recipe, impl="emulated")
        # default exclude: the LM head and the first and last layers stay bf16
        assert set(layers.applied) == {f"decoder.layers.{i}.{n}" for i in (1, 2) for n in LINEARS}
        assert layers.kept["output_layer"] == "excluded (output_layer)"
        assert layers.kept["decoder.layers.0.mlp.linear_fc1"] == "excluded (first)"
        assert layers.kept["decoder.layers.3.self_attention.linear_qkv"] == "excluded (last)"
        loss, grads = _step(ddp, tokens)
        impls = [m._forward_impl for m in layers.applied.values()]
        assert all(isinstance(i, FP8ForwardImpl) and i.calls == {recipe: 1} for i in impls)
        print(recipe, "bf16 loss", ref_loss, "fp8 loss", loss)
        assert loss == pytest.approx(ref_loss, rel=1e-2)
        for name in ("module.module.decoder.layers.1.mlp.linear_fc2.weight",
                     "module.module.decoder.layers.2.self_attention.linear_qkv.weight",
                     "module.module.embedding.word_embeddings.weight"):
            rel = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
            assert rel < 0.15, (name, float(rel))  # the FP8 wgrad went into main_grad
        layers.remove()
        assert all("_forward_impl" not in m.__dict__ for m in layers.applied.values()) or not layers.applied
        again, _ = _step(ddp, tokens)
        assert again == ref_loss


def test_dimension_not_divisible_by_the_block_stays_bf16_said_once(capsys):
    with single_process_megatron(seed=3), wgrad_accumulation_patch():
        ddp = _gpt(3, 64, 128, 16)
        tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
        layers = apply_fp8([ddp], "blockwise", exclude=["output_layer"], impl="emulated")
        for _ in range(2):
            _step(ddp, tokens)
        out = capsys.readouterr().out
        assert out.count("decoder.layers.0.mlp.linear_fc1: GEMM 32x64 @ 64x256 not covered by blockwise") == 1
        assert all(m._forward_impl.calls == {"bf16": 2} for m in layers.applied.values())


def test_exclude_patterns():
    assert cuda_fp8.excluded("module.module.decoder.layers.5.mlp.linear_fc2", 6, 8, ["*.linear_fc2"]) == "*.linear_fc2"
    assert cuda_fp8.excluded("module.decoder.layers.0.mlp.linear_fc1", 1, 8, ["first"]) == "first"
    assert cuda_fp8.excluded("decoder.layers.7.mlp.linear_fc1", 8, 8, ["first", "last"]) == "last"
    assert cuda_fp8.excluded("decoder.layers.3.mlp.linear_fc1", 4, 8, ["first", "last", "output_layer"]) is None
    assert cuda_fp8.excluded("output_layer", None, 8, ["output_layer"]) == "output_layer"


def test_adaptive_picks_the_fastest_within_the_error_budget(capsys):
    timings = {"bf16": (1.0, 0.0), "tensorwise": (0.5, 0.2), "rowwise": (0.7, 0.03), "blockwise": (0.6, 0.05)}
    chooser = AdaptiveChooser(budget=0.04, measure=lambda c, m, n, k: timings[c])
    assert chooser.choose(256, 256, 256) == "rowwise"  # tensorwise faster but over budget; blockwise too
    assert chooser.choose(256, 256, 256) == "rowwise" and len(chooser.reports) == 1  # timed once per shape
    assert chooser.choose(48, 256, 256) == "rowwise"  # a new shape is measured afresh
    assert set(chooser.reports[(48, 256, 256)]) == {"bf16", "tensorwise", "rowwise"}  # blockwise: 48 rows
    chooser = AdaptiveChooser(budget=0.01, measure=lambda c, m, n, k: timings[c])
    assert chooser.choose(256, 256, 256) == "bf16"
    out = capsys.readouterr().out
    assert "adaptive GEMM 256x256 @ 256x256" in out and "-> rowwise (error budget 0.04)" in out


def test_adaptive_through_the_layers_prints_each_layer_choice(capsys):
    measured = []

    def measure(c, m, n, k):
        measured.append((c, m, n, k))
        return {"bf16": 1.0, "tensorwise": 0.9, "rowwise": 0.5, "blockwise": 0.4}[c], 0.01

    with single_process_megatron(seed=3), wgrad_accumulation_patch():
        ddp = _gpt(4, 64, 128, 16)
        tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
        layers = apply_fp8([ddp], "adaptive", impl="emulated", measure=measure)
        _step(ddp, tokens)
    out = capsys.readouterr().out
    # 4 GEMM shapes (qkv, proj, fc1, fc2) timed once each though two layers use each
    assert len({(m, n, k) for _, m, n, k in measured}) == 4 and len(layers.chooser.choices) == 4
    assert "decoder.layers.1.mlp.linear_fc1: GEMM 32x64 @ 64x256 -> rowwise" in out
    assert "decoder.layers.2.mlp.linear_fc1: GEMM 32x64 @ 64x256 -> rowwise" in out


@pytest.mark.parametrize(("section", "device", "capability", "key"), [
    ({"recipe": "tensorwise"}, "cpu", None, "precision.fp8.recipe"),
    ({"recipe": "blockwise"}, "cuda", (8, 0), "precision.fp8.recipe"),
    ({"recipe": "fp4"}, "cuda", (9, 0), "precision.fp8.recipe"),
    ({"recipe": "adaptive", "error_budget": 0.0}, "cuda", (9, 0), "precision.fp8.error_budget"),
])
def test_bad_fp8_config_refused_naming_the_key(section, device, capability, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_fp8_config(section, device, capability)


def test_fp8_accepted_on_hopper_and_off_by_default():
    assert check_fp8_config({"recipe": "blockwise"}, "cuda", (9, 0)) == "blockwise"
    assert check_fp8_config({"recipe": None}, "cpu", None) is None


def _precision(**kw):
    from loongforge.config.schema import PrecisionConfig

    cfg = OmegaConf.structured(PrecisionConfig)
    for key, value in kw.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_cuda_backend_refuses_fp8_without_a_capable_gpu(monkeypatch):
    from loongforge_cuda.backend import CudaBackend

    backend = CudaBackend()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"precision\.fp8\.recipe.*CUDA device"):
        backend.configure_precision(_precision(**{"fp8.recipe": "rowwise"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    with pytest.raises(ConfigError, match=r"precision\.fp8\.recipe.*8\.9"):
        backend.configure_precision(_precision(**{"fp8.recipe": "rowwise"}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    backend.configure_precision(_precision(**{"fp8.recipe": "rowwise", "fp8.exclude": ["output_layer"]}))
    assert backend.fp8["recipe"] == "rowwise" and list(backend.fp8["exclude"]) == ["output_layer"]
    backend.configure_precision(_precision())
    assert backend.fp8 is None


def test_core_refuses_fp8_on_a_backend_without_it():
    from loongforge.backends.cpu import CpuBackend
    from loongforge.config.schema import RunConfig
    from loongforge.trainer.runtime import configure_precision

    cfg = OmegaConf.structured(RunConfig)
    configure_precision(cfg, CpuBackend())  # off: fine
    cfg.precision.fp8.recipe = "blockwise"
    with pytest.raises(ConfigError, match=r"precision\.fp8\.recipe.*'cpu' has no FP8"):
        configure_precision(cfg, CpuBackend())
    cfg.precision.fp8.recipe = None
    cfg.precision.layer_spec = "te"
    with pytest.raises(ConfigError, match=r"precision\.layer_spec"):
        configure_precision(cfg, CpuBackend())


def test_te_layer_spec_refused_without_te_and_selected_with_it(monkeypatch):
    from loongforge_cuda import te
    from loongforge_cuda.backend import CudaBackend

    backend = CudaBackend()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if not te.te_installed():
        with pytest.raises(ConfigError, match=r"precision\.layer_spec.*Transformer Engine"):
            backend.configure_precision(_precision(layer_spec="te"))
    with pytest.raises(ConfigError, match=r"precision\.layer_spec.*'fast'"):
        backend.configure_precision(_precision(layer_spec="fast"))
    monkeypatch.setattr(te, "te_installed", lambda: True)
    sentinel = object()
    monkeypatch.setattr(te, "te_layer_spec", lambda config: sentinel)
    backend.configure_precision(_precision(layer_spec="te"))
    assert backend.layer_spec_choice == "te" and backend.layer_spec(object(), {}) is sentinel
    backend.configure_precision(_precision(layer_spec="local"))
    assert backend.layer_spec_choice == "local"
