"""Per-step MoE metrics (``loongforge_llm.moe.metrics``) against a direct computation from the
routers' inputs: the load-balancing loss (switch-transformer form, as megatron-core's
``aux_loss`` defines it), the expert load imbalance (max / mean tokens per expert) and the
fraction of dropped token assignments under a capacity limit."""

from __future__ import annotations

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge_llm.moe.metrics import MoEStepMetrics
from loongforge_llm.moe.provider import MoEProvider


def tiny(load_size, **moe):
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(load_size("qwen3_moe", "qwen3_moe_tiny"))
    d["moe"] = moe
    return MoEProvider(d)


def train_forward(provider, backend, seed=0):
    run = RunSettings()
    torch.manual_seed(seed)
    model = provider.build(provider.transformer_config(run), run, backend=backend).train()
    inputs = []
    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(lambda m, i, o, store=inputs: store.append((m, i[0].detach(), o[1])))
    metrics = MoEStepMetrics([model], model.config, num_microbatches=1)
    ids = torch.randint(0, provider.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    loss = model(ids, torch.arange(16).expand(2, 16), None, labels=ids)
    loss.sum().backward()
    return metrics.collect(step=1), inputs


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_metrics_match_direct_computation(mcore, load_size, capacity):
    provider = tiny(load_size, capacity_factor=capacity)
    got, routed = train_forward(provider, mcore)
    k, experts = provider.moe.top_k, provider.moe.num_experts
    aux, imbalance, dropped, assigned = [], [], 0, 0
    for router, x, routing_map in routed:
        x = x.reshape(-1, x.shape[-1])
        tokens = x.shape[0]
        probs = torch.softmax(x.double() @ router.weight.double().t(), dim=-1)
        chosen = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=-1).indices, 1.0)
        per_expert = chosen.sum(0)  # before any capacity limit
        aux.append(float((probs.sum(0) * per_expert).sum() * experts / (k * tokens * tokens)))
        kept = routing_map.sum(0).double()
        imbalance.append(float(kept.max() / kept.mean()))
        dropped += tokens * k - int(routing_map.sum())
        assigned += tokens * k
        if capacity is None:
            assert torch.equal(kept, per_expert)
    assert got["moe_aux_loss"] == pytest.approx(sum(aux) / len(aux), rel=1e-5)
    assert got["moe_load_imbalance"] == pytest.approx(sum(imbalance) / len(imbalance), rel=1e-9)
    assert got["moe_load_imbalance_max"] == pytest.approx(max(imbalance), rel=1e-9)
    assert got["moe_dropped_frac"] == pytest.approx(dropped / assigned)
    assert (got["moe_dropped_frac"] > 0) == (capacity is not None)
