"""Qwen2 weights: the dense layout plus the fused q/k/v bias (``linear_qkv.bias``)."""

from __future__ import annotations

from loongforge.weight_mapping import Rule

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.weights import dense_rules, qkv_bias_rule


def rules(args: DenseArgs, padded_vocab_size: int) -> list[Rule]:
    return [*dense_rules(args, padded_vocab_size), qkv_bias_rule(args)]
