"""Flow matching objective, timestep sampling, CFG dropout, expert ranges and the sampler."""

import math
from types import SimpleNamespace

import pytest
import torch
from loongforge.config import ConfigError
from loongforge_diffusion.flow import FlowMatching, shift_sigma, unshift_sigma
from loongforge_diffusion.sampler import route_experts, sample


def _cfg(**kw):
    base = dict(shift=5.0, timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, loss_weighting="none",
                cfg_dropout=0.1, first_frame_prob=0.0, expert="both")
    return SimpleNamespace(**(base | kw))


def test_shift_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=5.0)
    s.set_timesteps(6)
    # diffusers spaces its unshifted sigmas from 1 to its (already shifted) sigma_min
    base = torch.linspace(1.0, float(shift_sigma(torch.tensor(1 / 1000), 5.0)), 6, dtype=torch.float64)
    assert torch.allclose(shift_sigma(base, 5.0).float(), s.sigmas[:-1], atol=1e-6)
    u = torch.rand(100, dtype=torch.float64)
    assert torch.allclose(unshift_sigma(shift_sigma(u, 3.0), 3.0), u)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_sampled_sigma_distribution(sampling):
    fm = FlowMatching.from_config(_cfg(timestep_sampling=sampling, shift=3.0))
    g = torch.Generator().manual_seed(0)
    sigma = fm.sample_sigma(20000, g).double()
    assert 0.0 <= sigma.min() and sigma.max() <= 1.0
    u = unshift_sigma(sigma, 3.0)  # back to the base draw
    if sampling == "uniform":
        assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    else:
        z = torch.logit(u.clamp(1e-7, 1 - 1e-7))
        assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03


def test_expert_ranges():
    for expert, (lo, hi) in {"high": (875, 1000), "low": (0, 875)}.items():
        fm = FlowMatching.from_config(_cfg(expert=expert, timestep_sampling="logit_normal"), boundary_ratio=0.875)
        t = fm.sample_sigma(5000, torch.Generator().manual_seed(1)) * 1000
        assert lo <= t.min() and t.max() <= hi, expert
        assert t.max() - t.min() > 0.5 * (hi - lo)
    with pytest.raises(ConfigError, match="diffusion.expert"):
        FlowMatching.from_config(_cfg(expert="high"), boundary_ratio=None)


def test_prepare_targets_and_cfg_dropout():
    fm = FlowMatching.from_config(_cfg(cfg_dropout=0.5))
    x0 = torch.randn(64, 4, 3, 4, 4)
    text, null = torch.randn(64, 5, 8), torch.zeros(1, 5, 8)
    out = fm.prepare(x0, text, null, torch.Generator().manual_seed(0))
    s = out["sigma"].view(-1, 1, 1, 1, 1)
    noise = out["target"] + x0
    assert torch.allclose(out["x_t"], (1 - s) * x0 + s * noise, atol=1e-6)
    dropped = (out["text"] == 0).all(dim=(1, 2))
    kept = torch.isclose(out["text"], text).all(dim=(1, 2))
    assert bool((dropped ^ kept).all()) and 16 < int(dropped.sum()) < 48
    assert torch.allclose(out["timestep"], out["sigma"] * 1000)


def test_first_frame_condition_excluded_from_loss():
    fm = FlowMatching.from_config(_cfg(first_frame_prob=1.0, cfg_dropout=0.0))
    x0 = torch.randn(2, 4, 3, 4, 4)
    out = fm.prepare(x0, torch.randn(2, 5, 8), torch.zeros(1, 5, 8), torch.Generator().manual_seed(0), per_token=True)
    assert torch.equal(out["x_t"][:, :, 0], x0[:, :, 0])
    assert (out["frame_t"][:, 0] == 0).all() and (out["frame_t"][:, 1:] > 0).all()
    tok = FlowMatching.token_timesteps(out["frame_t"], (3, 2, 2))
    assert tok.shape == (2, 12) and (tok[:, :4] == 0).all()
    pred = out["target"].clone()
    pred[:, :, 0] += 100.0  # errors on the conditioning frame do not count
    loss, n = fm.loss_sum(pred, out["target"], out["frame_mask"], out["weight"])
    assert loss.item() == 0.0 and n.item() == 2
    with pytest.raises(ValueError, match="first_frame_prob"):
        fm.prepare(x0, torch.randn(2, 5, 8), torch.zeros(1, 5, 8))


def test_bell_weighting_has_mean_one():
    fm = FlowMatching.from_config(_cfg(loss_weighting="bell"))
    w = fm.weight(torch.arange(1000.0))
    assert math.isclose(w.mean().item(), 1.0, rel_tol=1e-5) and w[500] > w[0]


@pytest.mark.parametrize("solver,tol", [("euler", 1e-4), ("unipc", 2e-2)])
def test_sampler_reaches_the_data_point(solver, tol):
    """With the exact velocity of a one-point data set, (x_t - x0) / sigma, sampling returns x0."""
    x0 = torch.randn(1, 4, 2, 3, 3)

    def velocity(x, t, text):
        return (x - x0) / (t.view(-1, 1, 1, 1, 1) / 1000)

    out = sample(velocity, x0.shape, torch.zeros(1, 2, 8), steps=12, shift=5.0, solver=solver,
                 generator=torch.Generator().manual_seed(0))
    assert (out - x0).abs().max() < tol


def test_cfg_mix_and_expert_routing():
    calls = []
    high = lambda x, t, c: (calls.append(("high", float(t[0]))), c.mean() * torch.ones_like(x))[1]  # noqa: E731
    low = lambda x, t, c: (calls.append(("low", float(t[0]))), c.mean() * torch.ones_like(x))[1]  # noqa: E731
    v = route_experts(high, low, 0.875)
    sample(v, (1, 1, 1, 2, 2), torch.ones(1, 2, 3), torch.zeros(1, 2, 3), steps=6, guidance=3.0, shift=5.0)
    assert all((name == "high") == (t >= 875) for name, t in calls)
    assert {n for n, _ in calls} == {"high", "low"} and len(calls) == 12
