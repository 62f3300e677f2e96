"""``GroupedExperts`` against megatron-core's ``SequentialMLP`` (the per-expert reference) and the
MoE options that change routing (capacity + token dropping, router z-loss).

Both expert modules are built from one ``TransformerConfig`` and given the same weights; the same
permuted tokens, per-expert counts (an expert with no tokens included) and routing probabilities
give the same outputs and the same gradients for the tokens, the probabilities and every weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

H, FFN, EXPERTS = 32, 24, 4


def config(**extra):
    from megatron.core.transformer import TransformerConfig

    fields = dict(num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=EXPERTS, moe_ffn_hidden_size=FFN,
                  ffn_hidden_size=4 * H, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                  use_cpu_initialization=True, bias_activation_fusion=False, moe_router_topk=2,
                  moe_token_dispatcher_type="alltoall", hidden_dropout=0.0)
    fields.update(extra)
    return TransformerConfig(**fields)


def expert_pair(cfg):
    from loongforge_llm.moe.experts import GroupedExperts
    from loongforge_llm.moe.spec import experts_builder
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    sequential = experts_builder(grouped_gemm=False)(EXPERTS, cfg, pg_collection=pgs)
    grouped = GroupedExperts(EXPERTS, cfg, pg_collection=pgs)
    with torch.no_grad():
        for e, mlp in enumerate(sequential.local_experts):
            grouped.fc1_weight[e].copy_(mlp.linear_fc1.weight)
            grouped.fc2_weight[e].copy_(mlp.linear_fc2.weight)
    return sequential, grouped


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1]])
def test_grouped_experts_match_sequential_mlp(mcore, counts):
    torch.manual_seed(0)
    sequential, grouped = expert_pair(config())
    tokens = torch.randn(sum(counts), H)
    probs = torch.rand(sum(counts))
    tokens_per_expert = torch.tensor(counts)
    outs, grads = [], []
    for module in (sequential, grouped):
        x, p = tokens.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = module(x, tokens_per_expert, p)
        assert bias is None
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append((x.grad, p.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for g_ours, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-6)
    for e, mlp in enumerate(sequential.local_experts):
        torch.testing.assert_close(grouped.fc1_weight.grad[e], mlp.linear_fc1.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grouped.fc2_weight.grad[e], mlp.linear_fc2.weight.grad, rtol=1e-6, atol=1e-6)
        if counts[e] == 0:
            assert not grouped.fc1_weight.grad[e].any()


def test_grouped_matmul_loop_matches_reference():
    from loongforge_llm.moe.experts import grouped_matmul, uses_grouped_mm

    x, w = torch.randn(9, 8), torch.randn(3, 8, 5)
    counts = torch.tensor([4, 0, 5])
    assert not uses_grouped_mm(x, w)  # CPU fp32: the per-expert loop
    ref = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
    torch.testing.assert_close(grouped_matmul(x, w, counts), ref)


def moe_layer(cfg):
    from loongforge_llm.moe.spec import moe_mlp_builder
    from megatron.core.process_groups_config import ProcessGroupCollection

    return moe_mlp_builder(grouped_gemm=True)(config=cfg, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                                              layer_number=1)


def test_capacity_factor_drops_tokens(mcore):
    """``moe_expert_capacity_factor`` (``model.moe.capacity_factor``): with every token routed to
    one expert, each expert takes at most capacity tokens; the rest of that expert's share is
    dropped (its output rows are zero), which the dropless layer does not do."""
    torch.manual_seed(0)
    tokens = 16
    outputs = {}
    x = torch.rand(tokens, 1, H) + 0.1
    for name, extra in {"dropless": {}, "capacity": {"moe_expert_capacity_factor": 1.0}}.items():
        layer = moe_layer(config(moe_router_topk=1, moe_router_pre_softmax=True, moe_router_load_balancing_type="none",
                                 **extra)).eval()
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0].fill_(1.0)  # every (positive) token prefers expert 0
        with torch.no_grad():
            outputs[name] = layer(x)[0]
    dropped = (outputs["capacity"].abs().sum(-1) == 0).sum().item()
    # capacity = factor x tokens x top-k / experts = 4 tokens per expert: 12 of the 16 are dropped
    assert dropped == tokens - tokens // EXPERTS
    assert (outputs["dropless"].abs().sum(-1) > 0).all()


def test_z_loss_adds_router_gradient(mcore):
    """``moe_z_loss_coeff`` (``model.moe.z_loss_coeff``) adds the z-loss gradient to the router
    without changing the layer's output."""
    grads, outs, state = [], [], None
    x = torch.randn(8, 1, H)
    for z in (None, 1e-1):
        layer = moe_layer(config(moe_router_load_balancing_type="none", moe_z_loss_coeff=z)).train()
        state = state or layer.state_dict()
        layer.load_state_dict(state)
        out = layer(x)[0]
        out.sum().backward()
        outs.append(out.detach())
        grads.append(layer.router.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(grads[0], grads[1])
