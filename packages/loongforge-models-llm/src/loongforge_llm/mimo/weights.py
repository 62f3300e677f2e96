"""MiMo weights: the main model maps like Qwen2 (the MTP layers are ignored, see the family)."""

from __future__ import annotations

from loongforge.weight_mapping import Rule

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.qwen2.weights import rules as qwen2_rules


def rules(args: DenseArgs, padded_vocab_size: int) -> list[Rule]:
    return qwen2_rules(args, padded_vocab_size)
