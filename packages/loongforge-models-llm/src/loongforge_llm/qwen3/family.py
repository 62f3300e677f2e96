from __future__ import annotations

from dataclasses import dataclass

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.family import FamilySpec


@dataclass(frozen=True)
class Qwen3Family(FamilySpec):
    def hf_extra(self, args: DenseArgs) -> dict:
        return {
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": args.num_hidden_layers,
        }


FAMILY = Qwen3Family(
    name="qwen3",
    hf_model_types=("qwen3",),
    hf_model_type="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    config_groups=("qwen3",),
    rules="loongforge_llm.qwen3.weights:rules",
    qkv_bias=False,
    qk_norm=True,
    hf_reference="transformers:Qwen3ForCausalLM",
    description="Qwen3 dense (QK-norm, decoupled head_dim)",
)
