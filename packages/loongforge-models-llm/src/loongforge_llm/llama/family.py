from __future__ import annotations

from dataclasses import dataclass

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.family import FamilySpec


@dataclass(frozen=True)
class LlamaFamily(FamilySpec):
    def hf_extra(self, args: DenseArgs) -> dict:
        return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


FAMILY = LlamaFamily(
    name="llama",
    hf_model_types=("llama",),
    hf_model_type="llama",
    hf_architecture="LlamaForCausalLM",
    config_groups=("llama2", "llama3"),
    rules="loongforge_llm.llama.weights:rules",
    qkv_bias=False,
    hf_reference="transformers:LlamaForCausalLM",
    description="LLaMA 2, LLaMA 3/3.1/3.2 (llama3 RoPE scaling)",
)
