"""Every field of the supported transformers config classes is read, knowingly ignored, or refused
(``loongforge_llm.common.hf_fields``); refused fields and unknown keys fail by name."""

from __future__ import annotations

import pytest
import transformers
from loongforge_llm.common.args import ModelConfigError
from loongforge_llm.common.hf_fields import HARMLESS, OWN, REFUSED_UNLESS, USED
from loongforge_llm.provider import LLMProvider, model_cfg_from_hf_config

#: family -> the transformers config class its parity tests compare against
CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def test_the_field_sets_do_not_overlap():
    sets = {"USED": USED, "HARMLESS": HARMLESS, "REFUSED_UNLESS": set(REFUSED_UNLESS), "OWN": OWN}
    for a, x in sets.items():
        for b, y in sets.items():
            assert a == b or not (x & y), (a, b, x & y)


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_every_hf_config_field_is_classified(family):
    fields = set(CLASSES[family](**TINY).to_dict())
    unclassified = sorted(fields - USED - HARMLESS - set(REFUSED_UNLESS))
    assert not unclassified, (f"{CLASSES[family].__name__} has fields LoongForge neither reads, ignores knowingly "
                              f"nor refuses: {unclassified}; classify them in loongforge_llm.common.hf_fields")
    # and a default config of the class is accepted as it is
    section = model_cfg_from_hf_config(CLASSES[family](**TINY).to_dict())
    assert section["family"] == family


@pytest.mark.parametrize(("family", "change", "message"), [
    ("qwen2", {"use_sliding_window": True}, "config key 'model.use_sliding_window': True is not supported"),
    ("qwen3", {"use_sliding_window": True}, "sliding-window attention is not implemented"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "config key 'model.layer_types'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "config key 'model.rope_scaling.rope_type': 'yarn' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "'dynamic'"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5,
                                   "rope_theta": 10000.0}}, "'model.rope_scaling.partial_rotary_factor'"),
    ("llama", {"mlp_bias": True}, "'model.mlp_bias'"),
    ("llama", {"hidden_act": "gelu"}, "'model.hidden_act'"),
])
def test_fields_we_do_not_implement_are_refused(family, change, message):
    hf = CLASSES[family](**TINY).to_dict()
    hf.update(change)
    with pytest.raises(ModelConfigError, match=None) as info:
        model_cfg_from_hf_config(hf)
    assert message in str(info.value)


def test_unknown_key_names_the_closest_fields(load_size):
    section = load_size("qwen3", "qwen3_tiny")
    section["hiden_size"] = 64
    with pytest.raises(ModelConfigError) as info:
        LLMProvider(section)
    assert "unknown config key 'model.hiden_size' for the qwen3 family. Did you mean 'hidden_size'" in str(info.value)
