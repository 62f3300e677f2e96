from __future__ import annotations

from dataclasses import dataclass

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.family import FamilySpec


@dataclass(frozen=True)
class Qwen2Family(FamilySpec):
    def hf_extra(self, args: DenseArgs) -> dict:
        # HF's Qwen2 attention always has q/k/v biases (no config switch); sliding window unused
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": args.num_hidden_layers}


FAMILY = Qwen2Family(
    name="qwen2",
    hf_model_types=("qwen2",),
    hf_model_type="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    config_groups=("qwen1_5", "qwen2", "qwen2_5"),
    rules="loongforge_llm.qwen2.weights:rules",
    qkv_bias=True,
    hf_reference="transformers:Qwen2ForCausalLM",
    description="Qwen1.5, Qwen2, Qwen2.5 (q/k/v bias)",
)
