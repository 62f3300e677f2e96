"""What an MoE family adds to :class:`~loongforge_llm.common.family.FamilySpec` (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loongforge_llm.common.family import FamilySpec
from loongforge_llm.moe.args import MoEArgs


@dataclass(frozen=True)
class MoEFamilySpec(FamilySpec):
    """An MoE family folder. ``moe_args``: ``"module:fn"``, ``fn(section, dense_args) -> MoEArgs``.
    ``rules``: ``fn(args, moe, padded_vocab_size, *, ep_rank, ep_size, etp_rank, etp_size)``.
    ``moe_mlp``: ``fn(config, moe)`` -> the ``mlp`` builder of an MoE layer."""

    provider: str = "loongforge_llm.moe.provider:MoEProvider"
    moe: bool = True
    moe_args: str = ""
    moe_mlp: str = "loongforge_llm.moe.spec:routed_experts_mlp"
    #: the MoE config.json fields the MoE parser reads (``output_router_logits``: HF's inference flag),
    #: and ``moe``, our own options (``moe/args.py``)
    hf_fields: tuple[str, ...] = ("moe", "num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
                                  "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
                                  "output_router_logits")

    def moe_config_fields(self, section: dict[str, Any], moe: MoEArgs) -> dict[str, Any]:
        """Family-specific MoE ``TransformerConfig`` fields (routing function, shared experts...)."""
        return {}

    def moe_hf_config(self, section: dict[str, Any], moe: MoEArgs) -> dict[str, Any]:
        """Family-specific MoE ``config.json`` fields."""
        return {}

    def moe_extra_params(self, args, moe: MoEArgs) -> int:
        """Parameters of one MoE layer's MLP beyond the router and the routed experts."""
        return 0
