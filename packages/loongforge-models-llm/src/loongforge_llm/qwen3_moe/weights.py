"""Qwen3-MoE weights: Qwen3's dense layout, with the MLP of the MoE layers as router + experts."""

from __future__ import annotations

import dataclasses

from loongforge.weight_mapping import Rule

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.weights import HF_LAYER, OURS_LAYER
from loongforge_llm.moe.args import MoEArgs
from loongforge_llm.moe.weights import moe_layer_rules
from loongforge_llm.qwen3.weights import rules as qwen3_rules

#: our dense-MLP parameters (present only in the dense layers of an MoE model)
DENSE_MLP = (f"{OURS_LAYER}.mlp.linear_fc1.weight", f"{OURS_LAYER}.mlp.linear_fc2.weight")


def rules(args: DenseArgs, moe: MoEArgs, padded_vocab_size: int, *, ep_rank: int = 0, ep_size: int = 1,
          etp_rank: int = 0, etp_size: int = 1) -> list[Rule]:
    moe_layers = frozenset(i for i, is_moe in enumerate(moe.moe_layers) if is_moe)
    dense_layers = frozenset(range(args.num_hidden_layers)) - moe_layers
    out: list[Rule] = []
    for rule in qwen3_rules(args, padded_vocab_size):
        if rule.ours in DENSE_MLP:
            if dense_layers:
                out.append(dataclasses.replace(rule, only_layers=dense_layers))
            continue
        out.append(rule)
    out += moe_layer_rules(f"{HF_LAYER}.mlp", f"{OURS_LAYER}.mlp", num_experts=moe.num_experts,
                           moe_layers=moe_layers, ep_rank=ep_rank, ep_size=ep_size, etp_rank=etp_rank,
                           etp_size=etp_size, grouped=moe.options.grouped_gemm)
    return out
