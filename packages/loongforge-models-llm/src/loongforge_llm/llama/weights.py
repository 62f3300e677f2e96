"""LLaMA weights: the plain dense-decoder layout (HF ``LlamaForCausalLM`` names)."""

from __future__ import annotations

from loongforge.weight_mapping import Rule

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.weights import dense_rules


def rules(args: DenseArgs, padded_vocab_size: int) -> list[Rule]:
    return dense_rules(args, padded_vocab_size)
