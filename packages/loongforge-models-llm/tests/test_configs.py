"""Every shipped size config parses, maps to a TransformerConfig, and has the published size."""

from __future__ import annotations

from pathlib import Path

import loongforge_llm
import pytest
from loongforge.model_provider import RunSettings
from loongforge_llm.families import FAMILIES
from loongforge_llm.provider import LLMProvider, model_cfg_from_hf_config
from omegaconf import OmegaConf

CONFIGS = Path(loongforge_llm.__file__).parent / "configs" / "models"


#: dense families (the MoE ones: test_moe_configs.py)
GROUPS = {g: f.name for f in FAMILIES.values() for g in f.config_groups if not f.moe}
SIZES = sorted((p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml") if p.parent.name in GROUPS)

#: HF parameter counts of published checkpoints
KNOWN_PARAMS = {
    "qwen3_0.6b": 596_049_920,
    "llama3.2_1b": 1_235_814_400,
    "llama2_7b": 6_738_415_616,
    "llama3_8b": 8_030_261_248,
    "qwen2.5_0.5b": 494_032_768,
    "qwen2.5_7b": 7_615_616_512,
}


def test_every_group_has_sizes_and_a_tiny_config():
    assert {g for g, _ in SIZES} == set(GROUPS) == {"llama2", "llama3", "qwen1_5", "qwen2", "qwen2_5", "qwen3", "mimo"}
    for group in GROUPS:
        assert any(g == group and name.endswith("_tiny") for g, name in SIZES), group
    assert len(SIZES) == 43  # 35 published sizes, 7 tiny test configs, the qwen3 demo


@pytest.mark.parametrize("group,name", SIZES)
def test_size_maps_to_transformer_config(group, name):
    node = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    assert node.family == GROUPS[group], f"{group}/{name}.yaml: family must be {GROUPS[group]!r}"
    p = LLMProvider(node)
    a = p.args
    if not p.qk_norm:  # HF derives head_dim for these families; the yaml must agree
        assert a.head_dim * a.num_attention_heads == a.hidden_size
    tc = p.transformer_config(RunSettings())
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (a.num_hidden_layers, a.hidden_size, a.intermediate_size)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (a.num_attention_heads, a.num_key_value_heads, a.head_dim)
    assert tc.add_qkv_bias == (p.family.name in ("qwen2", "mimo")) and not tc.add_bias_linear
    assert tc.qk_layernorm == (p.family.name == "qwen3")
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and tc.layernorm_epsilon == a.rms_norm_eps
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    # a realistic parallel layout: TP up to 8 dividing the KV heads, PP 2, bf16, sequence parallel
    tp = next(t for t in (8, 4, 2, 1) if a.num_key_value_heads % t == 0 and a.num_attention_heads % t == 0)
    run = RunSettings(tp=tp, pp=2, bf16=True, sequence_parallel=tp > 1, recompute_granularity="selective")
    tc = p.transformer_config(run)
    import torch

    assert tc.params_dtype == tc.pipeline_dtype == torch.bfloat16 and tc.tensor_model_parallel_size == tp
    assert p.padded_vocab_size(run) % (128 * tp) == 0 and p.padded_vocab_size(run) >= a.vocab_size


@pytest.mark.parametrize("name,count", sorted(KNOWN_PARAMS.items()))
def test_parameter_counts_match_published(name, count):
    group = next(g for g, n in SIZES if n == name)
    assert LLMProvider(OmegaConf.load(CONFIGS / group / f"{name}.yaml")).num_parameters() == count


@pytest.mark.parametrize("group,name", SIZES)
def test_hf_config_round_trip(group, name):
    node = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    p = LLMProvider(node)
    hf = LLMProvider(node).hf_config()
    assert hf["architectures"] == [p.family.hf_architecture] and hf["model_type"] in p.family.hf_model_types
    assert hf["torch_dtype"] == "bfloat16"
    again = LLMProvider(model_cfg_from_hf_config(hf))
    assert again.args == p.args and again.family is p.family
    if p.family.hf_reference is None:
        return
    import transformers

    cfg = dict(hf)
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert (hf_cfg.head_dim, hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings) == (
        p.args.head_dim, p.args.num_key_value_heads, p.args.tie_word_embeddings)
    assert hf_cfg.rope_parameters["rope_theta"] == p.args.rope_theta
    assert hf_cfg.rope_parameters["rope_type"] == (p.args.rope_scaling or {}).get("rope_type", "default")


def test_hydra_composes_from_the_package(tmp_path):
    """The configs are found through ``pkg://loongforge_llm.configs`` (the plugin's ConfigDir)."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "run.yaml").write_text(
        "defaults:\n  - /models/qwen2_5@model: qwen2.5_7b\n  - _self_\n"
        "hydra:\n  searchpath:\n    - pkg://loongforge_llm.configs\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose("run", overrides=["+models/qwen3@other=qwen3_0.6b"])
    assert cfg.model.family == "qwen2" and cfg.model.hidden_size == 3584
    assert cfg.other.family == "qwen3" and cfg.other.head_dim == 128
