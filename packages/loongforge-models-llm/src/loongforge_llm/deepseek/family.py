"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-latent attention, a dense MLP in the first
``first_k_dense_replace`` layers, then MoE layers with sigmoid routing, the auxiliary-loss-free
bias, group-limited top-k, ``routed_scaling_factor`` and shared experts (``deepseek.routing``).
Not built: the multi-token-prediction module (its HF tensors, ``model.layers.{num_hidden_layers}+``,
are ignored), YaRN RoPE scaling (refused), tensor parallelism of the latent projections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loongforge_llm.common.args import DenseArgs, ModelConfigError
from loongforge_llm.moe.args import MoEArgs, parse_options
from loongforge_llm.moe.family import MoEFamilySpec


def parse(section: dict[str, Any], args: DenseArgs) -> MoEArgs:
    from loongforge_llm.deepseek.routing import v3_moe_fields

    fields = v3_moe_fields(section)  # checks top-k, groups, norm_topk_prob
    first_dense = int(section.get("first_k_dense_replace") or 0)
    freq = int(section.get("moe_layer_freq") or 1)
    layers = tuple(i >= first_dense and i % freq == 0 for i in range(args.num_hidden_layers))
    if not any(layers):
        raise ModelConfigError("config key 'model.first_k_dense_replace' leaves no MoE layer")
    if section.get("rope_scaling") or (section.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ModelConfigError("config key 'model.rope_scaling': YaRN RoPE of DeepSeek is not supported yet")
    return MoEArgs(num_experts=fields["num_moe_experts"], top_k=fields["moe_router_topk"],
                   moe_intermediate_size=fields["moe_ffn_hidden_size"], norm_topk_prob=True,
                   router_aux_loss_coef=0.0, moe_layers=layers, options=parse_options(section.get("moe")))


@dataclass(frozen=True)
class DeepseekV3Family(MoEFamilySpec):
    def moe_extra_params(self, args, moe: MoEArgs) -> int:
        return 0

    def moe_hf_config(self, section: dict[str, Any], moe: MoEArgs) -> dict[str, Any]:
        keys = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "n_group",
                "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")
        out = {k: section[k] for k in keys if k in section}
        out["head_dim"] = section["qk_rope_head_dim"]  # HF's rotary embedding size
        return out


FAMILY = DeepseekV3Family(
    name="deepseek_v3",
    hf_model_types=("deepseek_v3",),
    hf_model_type="deepseek_v3",
    hf_architecture="DeepseekV3ForCausalLM",
    config_groups=("deepseek_v3",),
    rules="loongforge_llm.deepseek.weights:rules",
    moe_args="loongforge_llm.deepseek.family:parse",
    # MLA and routing fields the parser reads; num_nextn_predict_layers: the MTP layers, not built
    hf_fields=(*MoEFamilySpec.hf_fields, "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "qk_head_dim",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave", "n_group", "topk_group",
               "n_shared_experts", "routed_scaling_factor", "num_nextn_predict_layers"),
    moe_mlp="loongforge_llm.moe.spec:routed_and_shared_experts_mlp",
    provider="loongforge_llm.deepseek.provider:DeepseekV3Provider",
    hf_reference="transformers:DeepseekV3ForCausalLM",
    ignore_hf=(r"model\.layers\.\d+\.mlp\.gate\.e_score_correction_bias",),  # a buffer, loaded by the provider
    description="DeepSeek-V3 (MLA; sigmoid-routed + shared experts, bias balancing); no MTP, no YaRN",
)
