"""Every shipped MoE size config parses, maps to an MoE TransformerConfig, has the published
parameter count, and its exported config.json builds the transformers class with the same sizes."""

from __future__ import annotations

from pathlib import Path

import loongforge_llm
import pytest
from loongforge.model_provider import RunSettings
from loongforge.registry import load_object
from loongforge_llm.families import FAMILIES
from omegaconf import OmegaConf

CONFIGS = Path(loongforge_llm.__file__).parent / "configs" / "models"
GROUPS = {g: f for f in FAMILIES.values() if f.moe for g in f.config_groups}
SIZES = sorted((p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml") if p.parent.name in GROUPS)
#: (total, active) HF parameter counts of the published checkpoints (model cards: 30.5B/3.3B, 235B/22B)
KNOWN = {"qwen3_30b_a3b": (30_532_122_624, 3_353_032_704), "qwen3_coder_30b_a3b": (30_532_122_624, 3_353_032_704),
         "qwen3_235b_a22b": (235_093_634_560, 22_190_763_520)}


def provider(group, name):
    family = GROUPS[group]
    return load_object(family.provider)(OmegaConf.load(CONFIGS / group / f"{name}.yaml"))


def test_moe_groups():
    assert set(GROUPS) == {"qwen3_moe", "deepseek_v3"}
    assert {n for g, n in SIZES if g == "qwen3_moe"} == {"qwen3_30b_a3b", "qwen3_235b_a22b", "qwen3_coder_30b_a3b",
                                                         "qwen3_moe_tiny", "qwen3_moe_demo"}


@pytest.mark.parametrize("group,name", SIZES)
def test_moe_size_maps_to_transformer_config(group, name):
    p = provider(group, name)
    m = p.moe
    for run in (RunSettings(), RunSettings(ep=min(8, m.num_experts), bf16=True)):
        tc = p.transformer_config(run)
        assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (
            m.num_experts, m.top_k, m.moe_intermediate_size)
        assert tc.expert_model_parallel_size == run.ep and tc.moe_layer_freq == [int(x) for x in m.moe_layers]
        assert tc.moe_token_dispatcher_type == "alltoall" and tc.moe_expert_capacity_factor is None


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_parameter_counts_match_published(name):
    p = provider("qwen3_moe", name)
    assert (p.num_parameters(), p.num_parameters(active=True)) == KNOWN[name]


@pytest.mark.parametrize("group,name", SIZES)
def test_hf_config_builds_the_reference_class(group, name):
    import transformers

    p = provider(group, name)
    cfg = dict(p.hf_config())
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert type(hf_cfg).__name__.removesuffix("Config") + "ForCausalLM" == p.family.hf_architecture
    assert hf_cfg.num_local_experts == p.moe.num_experts and hf_cfg.num_experts_per_tok == p.moe.top_k
    assert hf_cfg.moe_intermediate_size == p.moe.moe_intermediate_size
