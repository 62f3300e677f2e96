"""Qwen3 weights: the dense layout plus per-head query/key RMSNorm weights."""

from __future__ import annotations

from loongforge.weight_mapping import Rename, Rule

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.weights import dense_rules


def rules(args: DenseArgs, padded_vocab_size: int) -> list[Rule]:
    return [
        *dense_rules(args, padded_vocab_size),
        Rename(hf="model.layers.{i}.self_attn.q_norm.weight", ours="decoder.layers.{i}.self_attention.q_layernorm.weight"),
        Rename(hf="model.layers.{i}.self_attn.k_norm.weight", ours="decoder.layers.{i}.self_attention.k_layernorm.weight"),
    ]
