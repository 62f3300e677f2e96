"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 attention (QK-norm, decoupled head_dim) with a
routed-experts MLP: softmax top-k routing, ``norm_topk_prob``, no shared expert; dense MLP
layers where ``mlp_only_layers``/``decoder_sparse_step`` say so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.moe.args import MoEArgs, parse_moe_args
from loongforge_llm.moe.family import MoEFamilySpec


def parse(section: dict[str, Any], args: DenseArgs) -> MoEArgs:
    return parse_moe_args(section, args.num_hidden_layers)


@dataclass(frozen=True)
class Qwen3MoeFamily(MoEFamilySpec):
    def hf_extra(self, args: DenseArgs) -> dict:
        return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": args.num_hidden_layers}

    def moe_hf_config(self, section: dict[str, Any], moe: MoEArgs) -> dict[str, Any]:
        dense = [i for i, is_moe in enumerate(moe.moe_layers) if not is_moe]
        step = section.get("decoder_sparse_step", 1) or 1
        return {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.moe_intermediate_size,
            "norm_topk_prob": moe.norm_topk_prob,
            "router_aux_loss_coef": moe.router_aux_loss_coef,
            "decoder_sparse_step": step,
            "mlp_only_layers": [i for i in dense if (i + 1) % step == 0],
        }


FAMILY = Qwen3MoeFamily(
    name="qwen3_moe",
    hf_model_types=("qwen3_moe",),
    hf_model_type="qwen3_moe",
    hf_architecture="Qwen3MoeForCausalLM",
    config_groups=("qwen3_moe",),
    rules="loongforge_llm.qwen3_moe.weights:rules",
    moe_args="loongforge_llm.qwen3_moe.family:parse",
    hf_fields=(*MoEFamilySpec.hf_fields, "decoder_sparse_step", "mlp_only_layers"),
    qkv_bias=False,
    qk_norm=True,
    hf_reference="transformers:Qwen3MoeForCausalLM",
    description="Qwen3-MoE (QK-norm; softmax top-k routed experts, no shared expert)",
)
