"""A third-party family on the shipped dense provider (``loongforge_llm.dense``): the example
plugin's ``example_dense`` (LLaMA layout + QK-norm, its own weight rules) is one short file and
matches HF's Qwen3 (same computation) logits; the ``loongforge_layer_spec`` hook reaches every
provider, the example plugin's own one included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from loongforge.model_provider import ModelProvider, RunSettings
from omegaconf import OmegaConf

EXAMPLE = Path(__file__).resolve().parents[3] / "tests" / "plugins" / "example_plugin" / "src"
TINY = EXAMPLE / "loongforge_example" / "configs" / "models" / "example_dense" / "example_dense_tiny.yaml"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import loongforge_example.dense

    return loongforge_example.dense


def test_the_family_is_under_40_lines(example):
    lines = Path(example.__file__).read_text().splitlines()
    print(f"loongforge_example/dense.py: {len(lines)} lines (plus {len(TINY.read_text().splitlines())} "
          "lines of size config and one line in the plugin's hook)")
    assert len(lines) < 40


def test_record_and_hf_config(example):
    rec = example.RECORD
    assert (rec.name, rec.hf_model_types, rec.config_groups) == ("example_dense", ("example_dense",),
                                                                 ("models/example_dense",))
    assert rec.supported is False  # no HF reference class of its own is declared
    from loongforge.registry import load_object

    assert load_object(rec.builder) is example.Provider
    section = load_object(rec.from_hf_config)({**OmegaConf.to_container(OmegaConf.load(TINY)),
                                               "model_type": "example_dense", "use_sliding_window": False})
    assert section["family"] == "example_dense"
    assert isinstance(example.Provider(OmegaConf.load(TINY)), ModelProvider)


def test_logits_match_hf_qwen3(mcore, example):
    provider = example.Provider(OmegaConf.load(TINY))
    assert provider.qk_norm and not provider.qkv_bias
    fields = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(TINY)).items() if k != "family"}
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore).eval()
    provider.load_hf_weights(ours, hf.state_dict().__getitem__)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(ids, torch.arange(32).expand(2, 32), None)[..., :1024]
        ref = hf(ids).logits
    rel = ((logits - ref).norm() / ref.norm()).item()
    print(f"example_dense vs HF Qwen3: relative logits error {rel:.2e}")
    assert rel < 1e-5


def test_layer_spec_hook_reaches_every_provider(mcore, example):
    """A plugin's ``loongforge_layer_spec`` answer is what the dense provider and the example
    plugin's own provider build their layers from."""
    from loongforge import hookimpl
    from loongforge.modules.attention import SDPAttention
    from loongforge.modules.layer_spec import local_sdpa_spec
    from loongforge.plugins import get_plugin_manager
    from loongforge_example.model import TinyGPTProvider

    class MarkedAttention(SDPAttention):
        pass

    class SpecPlugin:
        @hookimpl
        def loongforge_layer_spec(self, backend, config, model_cfg):
            spec = local_sdpa_spec(config)
            spec.submodules.self_attention.submodules.core_attention = MarkedAttention
            return spec

    pm = get_plugin_manager()
    plugin = SpecPlugin()
    pm.pm.register(plugin, name="spec-test")
    try:
        run = RunSettings(seq_length=32)
        for provider in (example.Provider(OmegaConf.load(TINY)),
                         TinyGPTProvider({"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                          "vocab_size": 128})):
            model = provider.build(provider.transformer_config(run), run, backend=mcore, pre_process=True,
                                   post_process=True)
            assert sum(isinstance(m, MarkedAttention) for m in model.modules()) == 2, type(provider).__name__
    finally:
        pm.pm.unregister(plugin)
