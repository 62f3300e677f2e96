"""DeepSeek-V3's MoE block on megatron-core's ``MoELayer`` (``deepseek.routing.v3_moe_fields``)
against ``transformers``' ``DeepseekV3MoE`` with the same random weights (fp32): sigmoid scores,
the ``e_score_correction_bias`` (megatron's router ``expert_bias``) in the choice only,
group-limited top-k (4 groups, 2 kept), ``routed_scaling_factor``, 2 shared experts. Output and
input gradient agree within 1e-5 relative. The full ``DeepseekV3ForCausalLM`` (MLA, MTP) is not
built here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

HF = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
          n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True, intermediate_size=64,
          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=64)


def hf_block(seed: int = 0):
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(seed)
    block = DeepseekV3MoE(transformers.DeepseekV3Config(**HF)).float()
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.copy_(0.2 * torch.randn_like(p))
        block.gate.e_score_correction_bias.copy_(0.05 * torch.randn(HF["n_routed_experts"]))
    return block


def our_block(grouped: bool):
    from loongforge_llm.deepseek.routing import v3_moe_fields
    from loongforge_llm.moe.args import MoEOptions
    from loongforge_llm.moe.spec import routed_and_shared_experts_mlp
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=HF["hidden_size"], num_attention_heads=4,
                               ffn_hidden_size=HF["intermediate_size"], gated_linear_unit=True, activation_func=F.silu,
                               add_bias_linear=False, use_cpu_initialization=True, bias_activation_fusion=False,
                               hidden_dropout=0.0, moe_token_dispatcher_type="alltoall", **v3_moe_fields(HF))
    moe = type("Moe", (), {"options": MoEOptions(grouped_gemm=grouped)})()
    builder = routed_and_shared_experts_mlp(config, moe)
    return builder(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(), layer_number=1)


def load(ours, hf) -> None:
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
        experts = ours.experts
        if hasattr(experts, "fc1_weight"):
            experts.fc1_weight.copy_(hf.experts.gate_up_proj)
            experts.fc2_weight.copy_(hf.experts.down_proj)
        else:
            for e, mlp in enumerate(experts.local_experts):
                mlp.linear_fc1.weight.copy_(hf.experts.gate_up_proj[e])
                mlp.linear_fc2.weight.copy_(hf.experts.down_proj[e])
        s = hf.shared_experts
        ours.shared_experts.linear_fc1.weight.copy_(torch.cat([s.gate_proj.weight, s.up_proj.weight]))
        ours.shared_experts.linear_fc2.weight.copy_(s.down_proj.weight)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_experts", "sequential_mlp"])
def test_v3_moe_block_matches_hf(mcore, grouped):
    hf = hf_block()
    ours = our_block(grouped)
    load(ours, hf)
    ours.eval()
    x = torch.randn(12, 2, HF["hidden_size"], generator=torch.Generator().manual_seed(1))
    x_ours, x_hf = x.clone().requires_grad_(), x.transpose(0, 1).contiguous().requires_grad_()
    out = ours(x_ours)[0]
    ref = hf(x_hf).transpose(0, 1)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"\ndeepseek-v3 MoE block ({'grouped' if grouped else 'sequential'}): rel error {rel:.2e}")
    assert rel < 1e-5
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    g_rel = ((x_ours.grad - x_hf.grad.transpose(0, 1)).norm() / x_hf.grad.norm()).item()
    assert g_rel < 1e-5


def test_bias_changes_choice_not_weight(mcore):
    """The correction bias picks other experts but their weights stay the unbiased sigmoid scores."""
    hf = hf_block(seed=2)
    ours = our_block(True)
    load(ours, hf)
    x = torch.randn(16, 1, HF["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, weights_hf, idx_hf = hf.gate(x.squeeze(1))
        probs, routing_map = ours.router(x)
    assert torch.equal(routing_map.nonzero()[:, 1].view(16, -1).sort(-1).values, idx_hf.sort(-1).values)
    torch.testing.assert_close(probs.gather(1, idx_hf), weights_hf, rtol=1e-6, atol=1e-6)
