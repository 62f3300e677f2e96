"""Packing clips of different sizes into one sequence: same loss (and gradients) as running them apart."""

from types import SimpleNamespace

import pytest
import torch
from loongforge_diffusion.batching import assemble, sample_tokens, token_loss_sum
from loongforge_diffusion.flow import FlowMatching
from loongforge_diffusion.testing import A14B, TI2V, rel_err
from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.model import WanDiT

FLOW = SimpleNamespace(shift=3.0, timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, loss_weighting="bell",
                       cfg_dropout=0.3, first_frame_prob=0.0, expert="both")


def _loss(model, items, pack, per_token):
    b = assemble(items, pack, per_token)
    out = model(b["tokens"], b["timestep"].double(), b["context"], positions=b["positions"],
                self_mask=b["self_mask"], cross_mask=b["cross_mask"])
    return token_loss_sum(out, b["target"], b["coef"])


@pytest.mark.parametrize("kwargs,expand,first", [(A14B, False, 0.0), (TI2V, True, 0.5)])
def test_packed_equals_separate(megatron_cpu, kwargs, expand, first):
    torch.manual_seed(0)
    wan = WanConfig.from_diffusers(dict(kwargs), expand_timesteps=expand)
    model = WanDiT(wan)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    flow = FlowMatching.from_config(SimpleNamespace(**{**vars(FLOW), "first_frame_prob": first}))
    c = wan.in_channels
    shapes = [(c, 3, 4, 6), (c, 2, 6, 4), (c, 1, 8, 8)]
    null = torch.zeros(5, 32)
    items = [sample_tokens(model, flow, torch.randn(s), torch.randn(5, 32), null, seed=i)
             for i, s in enumerate(shapes)]
    assert [it["tokens"].shape[0] for it in items] == [18, 12, 16]
    assert torch.equal(items[2]["positions"][0], torch.tensor([0, 0, 0]))  # RoPE restarts per clip
    separate = sum(_loss(model, [it], False, expand) for it in items)
    separate.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = _loss(model, items, True, expand)
    packed.backward()
    assert rel_err(packed.detach(), separate.detach()) < 1e-5
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) < 1e-4, n


def test_unequal_clips_need_packing(megatron_cpu):
    wan = WanConfig.from_diffusers(dict(A14B))
    model = WanDiT(wan)
    flow = FlowMatching.from_config(FLOW)
    items = [sample_tokens(model, flow, torch.randn(16, f, 4, 4), torch.randn(5, 32), torch.zeros(5, 32), seed=f)
             for f in (1, 2)]
    with pytest.raises(ValueError, match="diffusion.packing=true"):
        assemble(items, False, False)
