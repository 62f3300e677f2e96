"""DeepSeek-V3's MoE block in megatron-core's terms (HF ``DeepseekV3MoE``: ``DeepseekV3TopkRouter``
+ routed experts + shared experts).

HF routing: scores = sigmoid(logits); the choice adds ``e_score_correction_bias`` (the
auxiliary-loss-free balancing bias); groups of ``n_routed_experts / n_group`` experts are ranked
by the sum of their top-2 biased scores and the best ``topk_group`` groups kept; the top-k
experts of those by biased score are taken with their unbiased scores, renormalised
(``norm_topk_prob``) and multiplied by ``routed_scaling_factor``. megatron-core's ``TopKRouter``
does the same with ``moe_router_score_function="sigmoid"``, ``moe_router_enable_expert_bias``
(its ``expert_bias`` buffer is ``e_score_correction_bias``; it is updated by
``moe_router_bias_update_rate`` x sign(mean load - expert load) after each step),
``moe_router_num_groups``/``moe_router_group_topk`` (groups ranked by the sum of their top
``top_k / topk_group`` scores: equal to HF's top-2 only when ``top_k == 2 x topk_group``, which is
checked) and ``moe_router_topk_scaling_factor``. Shared experts: megatron's ``SharedExpertMLP`` of
``n_shared_experts x moe_intermediate_size``, added to the routed output.
"""

from __future__ import annotations

from typing import Any

from loongforge_llm.common.args import ModelConfigError


def v3_moe_fields(hf: dict[str, Any], *, bias_update_rate: float = 1e-3) -> dict[str, Any]:
    """``TransformerConfig`` MoE fields of an HF DeepSeek-V3 ``config.json`` dict."""
    experts = hf.get("n_routed_experts") or hf.get("num_local_experts")
    top_k, groups, group_topk = hf["num_experts_per_tok"], hf.get("n_group") or 1, hf.get("topk_group") or 1
    if top_k > experts:
        raise ModelConfigError(f"config key 'model.num_experts_per_tok' ({top_k}) exceeds 'model.n_routed_experts' "
                               f"({experts})")
    if experts % groups or group_topk > groups:
        raise ModelConfigError(f"config keys 'model.n_group' ({groups}) / 'model.topk_group' ({group_topk}) do not "
                               f"fit {experts} experts")
    if groups > 1 and top_k != 2 * group_topk:
        raise ModelConfigError(
            f"config keys 'model.num_experts_per_tok' ({top_k}) and 'model.topk_group' ({group_topk}): HF ranks "
            "groups by their top-2 scores, megatron-core by their top num_experts_per_tok / topk_group; they agree "
            "only when num_experts_per_tok = 2 x topk_group")
    if top_k > 1 and not hf.get("norm_topk_prob", True):
        raise ModelConfigError("config key 'model.norm_topk_prob'=false: megatron-core's sigmoid router always "
                               "renormalises the top-k scores")
    shared = hf.get("n_shared_experts") or 0
    return dict(
        num_moe_experts=experts,
        moe_router_topk=top_k,
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=bias_update_rate,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=group_topk if groups > 1 else None,
        moe_router_topk_scaling_factor=hf.get("routed_scaling_factor") or None,
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=shared * hf["moe_intermediate_size"] if shared else None,
        moe_router_load_balancing_type="none",  # V3 balances with the bias (a seq-aux loss is optional)
    )
