"""Activation recompute changes nothing but memory; A14B experts route each sample by its timestep."""

import torch
from loongforge_diffusion.task import _experts_class
from loongforge_diffusion.testing import A14B, rel_err
from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.model import WanDiT


def test_recompute_same_gradients(megatron_cpu):
    torch.manual_seed(0)
    model = WanDiT(WanConfig.from_diffusers(dict(A14B)))
    x, t, ctx = torch.randn(2, 16, 2, 4, 4), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 32)
    model(x, t, ctx).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.recompute = True
    model(x, t, ctx).square().mean().backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) < 1e-6, n


def test_experts_route_by_boundary(megatron_cpu):
    wan = WanConfig.from_diffusers(dict(A14B), boundary_ratio=0.875)
    torch.manual_seed(0)
    high, low = WanDiT(wan), WanDiT(wan)
    experts = _experts_class()(high, low, wan.boundary_ratio)
    x, ctx = torch.randn(3, 16, 2, 4, 4), torch.randn(3, 5, 32)
    t = torch.tensor([950.0, 100.0, 875.0])
    tokens = high.patchify(x)
    from loongforge_diffusion.wan.rope import grid_positions

    pos = grid_positions(2, 2, 2).expand(3, -1, -1)
    with torch.no_grad():  # one sample vs a batch of 3: same math, other GEMM blocking (atol 1e-5)
        out = experts(tokens, t, ctx, positions=pos)
        assert torch.allclose(out[0], high(tokens[:1], t[:1], ctx[:1], positions=pos[:1])[0], atol=1e-5)
        assert not torch.allclose(out[1], high(tokens[1:2], t[1:2], ctx[1:2], positions=pos[1:2])[0], atol=1e-3)
        assert torch.allclose(out[1], low(tokens[1:2], t[1:2], ctx[1:2], positions=pos[1:2])[0], atol=1e-5)
        assert torch.allclose(out[2], high(tokens[2:], t[2:], ctx[2:], positions=pos[2:])[0], atol=1e-5)  # t = boundary: high
    assert sorted(n.split(".")[0] for n, _ in experts.named_children()) == ["high", "low"]
