"""Our RoPE frequencies against transformers' and megatron-core's."""

from __future__ import annotations

import pytest
import torch
from loongforge_llm.common.args import ModelConfigError
from loongforge_llm.common.rope import inv_freq
from loongforge_llm.provider import LLMProvider


def hf_inv_freq(provider: LLMProvider) -> torch.Tensor:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = dict(provider.hf_config())
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    rope_type = hf_cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        return 1.0 / (hf_cfg.rope_parameters["rope_theta"] ** (torch.arange(0, provider.args.head_dim, 2).float() / provider.args.head_dim))
    return ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")[0]


@pytest.mark.parametrize("group,name", [("llama3", "llama3_tiny"), ("llama3", "llama3.1_8b"), ("llama3", "llama3.2_1b"),
                                        ("llama3", "llama3.1_405b"), ("qwen3", "qwen3_0.6b")])
def test_inv_freq_equals_transformers(load_size, group, name):
    p = LLMProvider(load_size(group, name))
    assert torch.equal(inv_freq(p.args.head_dim, p.args.rope_theta, p.args.rope_scaling), hf_inv_freq(p))


def test_linear_scaling_equals_transformers(load_size):
    cfg = load_size("llama2", "llama2_tiny")
    cfg.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    p = LLMProvider(cfg)
    assert torch.equal(inv_freq(p.args.head_dim, p.args.rope_theta, p.args.rope_scaling), hf_inv_freq(p))


def _megatron_llama3(head_dim, theta, factor):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, 1.0, rotary_base=theta, rope_scaling=True, rope_scaling_factor=factor,
                           use_cpu_initialization=True)
    return rope.inv_freq


@pytest.mark.parametrize("name", ["llama3.1_8b", "llama3.2_1b", "llama3.2_3b"])
def test_published_llama3_values_agree_with_megatron(load_size, name):
    p = LLMProvider(load_size("llama3", name))
    s = p.args.rope_scaling
    ours = inv_freq(p.args.head_dim, p.args.rope_theta, s)
    torch.testing.assert_close(ours, _megatron_llama3(p.args.head_dim, p.args.rope_theta, s["factor"]), rtol=1e-6, atol=0)


def test_megatron_hardcodes_original_context(load_size):
    """Why the provider installs its own frequencies: megatron-core fixes
    original_max_position_embeddings at 8192 (and the low/high factors at 1/4)."""
    p = LLMProvider(load_size("llama3", "llama3_tiny"))  # original_max_position_embeddings: 64
    s = p.args.rope_scaling
    ours = inv_freq(p.args.head_dim, p.args.rope_theta, s)
    assert not torch.allclose(ours, _megatron_llama3(p.args.head_dim, p.args.rope_theta, s["factor"]))


def test_rope_parameters_and_unsupported_types(load_size):
    cfg = dict(load_size("llama3", "llama3_tiny"))
    scaling = dict(cfg.pop("rope_scaling"))
    theta = cfg.pop("rope_theta")
    v5 = LLMProvider({**cfg, "rope_parameters": {**scaling, "rope_theta": theta}})  # transformers v5 layout
    assert v5.args.rope_theta == theta and v5.args.rope_scaling == scaling
    assert LLMProvider({**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}).args.rope_scaling is None
    with pytest.raises(ModelConfigError, match=r"model\.rope_scaling\.rope_type.*'yarn' is not supported"):
        LLMProvider({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelConfigError, match=r"model\.rope_scaling\.low_freq_factor"):
        LLMProvider({**cfg, "rope_scaling": {"type": "llama3", "factor": 4.0}})
