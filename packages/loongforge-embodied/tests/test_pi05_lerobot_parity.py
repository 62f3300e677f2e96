"""Pi0.5 mode vs lerobot 0.6.1's ``PI05Pytorch`` (tiny config, random weights, fp32).

lerobot pins torch < 2.12, so it is not in the workspace lock; the test runs where ``lerobot``
is importable (``scripts/lerobot_ref_env.sh`` builds such an environment) and is skipped elsewhere.
"""

import dataclasses

import pytest
import torch
from loongforge_embodied.flow_matching import FlowMatching
from loongforge_embodied.pi05.config import tiny_config
from loongforge_embodied.pi05.mapping import lerobot_mapping
from loongforge_embodied.pi05.model import PiModel

pytest.importorskip("lerobot.policies.pi05.modeling_pi05", exc_type=ImportError)



def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def pair(lerobot_pi05):
    # lerobot fixes PaliGemma's vocabulary (257152) and SigLIP's MLP width (4304) whatever the size
    c = tiny_config("pi05", vocab_size=257152)
    c = dataclasses.replace(c, vision=dataclasses.replace(c.vision, intermediate_size=4304))
    ref = lerobot_pi05(c)
    ours = PiModel(c).eval()
    res = ours.load_state_dict(lerobot_mapping().to_ours(ref.state_dict()), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return c, ref, ours


def inputs(c):
    torch.manual_seed(1)
    b, ncam, ntext = 2, 2, 6
    images = torch.rand(b, ncam, 3, c.vision.image_size, c.vision.image_size) * 2 - 1
    image_masks = torch.tensor([[True, True], [True, False]])        # second sample: one camera missing
    tokens = torch.randint(0, 1000, (b, ntext))
    token_masks = torch.ones(b, ntext, dtype=torch.bool)
    token_masks[0, -3:] = False
    actions = torch.randn(b, c.chunk_size, c.max_action_dim)
    noise = torch.randn_like(actions)
    return images, image_masks, tokens, token_masks, actions, noise, torch.tensor([0.25, 0.9])


def test_pi05_forward_matches_lerobot(pair):
    c, ref, ours = pair
    images, image_masks, tokens, token_masks, actions, noise, t = inputs(c)
    seen = {}
    ref.action_out_proj.register_forward_hook(lambda mod, i, o: seen.setdefault("v", o))
    with torch.no_grad():
        ref_losses = ref([images[:, k] for k in range(2)], [image_masks[:, k] for k in range(2)], tokens,
                         token_masks, actions, noise, t)
        x_t, u = FlowMatching.interpolate(actions, noise, t)
        v = ours(images, image_masks, tokens, token_masks, x_t, t)
        loss_sum, n = FlowMatching.loss_sum(v, u, action_dim=5)
    assert rel(v, seen["v"]) < 1e-5
    ref_loss = ref_losses[:, :, :5].mean()                        # PI05Policy.forward: truncate, mean
    assert abs(loss_sum.item() / n - ref_loss.item()) / ref_loss.item() < 1e-5


def test_pi05_sampler_matches_lerobot(pair):
    """lerobot's ``sample_actions`` needs transformers < 5.6 (its cached prefix calls
    ``create_causal_mask(cache_position=...)``), so the reference sampler here is lerobot's
    ``euler_integrate`` loop over lerobot's joint (uncached) forward; ours uses the cached prefix."""
    from lerobot.policies.common.flow_matching import euler_integrate

    c, ref, ours = pair
    images, image_masks, tokens, token_masks, _, noise, _ = inputs(c)
    seen = {}
    ref.action_out_proj.register_forward_hook(lambda mod, i, o: seen.__setitem__("v", o))
    cams, masks = [images[:, k] for k in range(2)], [image_masks[:, k] for k in range(2)]

    def ref_velocity(x_t, t):          # actions = noise = x_t gives x_t back (up to one rounding)
        ref(cams, masks, tokens, token_masks, x_t, x_t, t)
        return seen["v"]

    with torch.no_grad():
        want = euler_integrate(ref_velocity, noise.clone(), 3)
        cache, ppad = ours.prefix_cache(images, image_masks, tokens, token_masks)
        got = FlowMatching.euler(lambda x, t: ours.velocity_cached(cache, ppad, x, t), noise.clone(), steps=3)
    assert rel(got, want) < 1e-5


def test_pi05_weights_round_trip_bit_identical(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    c, ref, ours = pair
    m = lerobot_mapping()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()
               if not m.ignored(k)}, tmp_path / "lerobot.safetensors")
    theirs = load_file(tmp_path / "lerobot.safetensors")
    save_file(m.to_ours(theirs), tmp_path / "ours.safetensors")
    save_file(m.to_theirs(load_file(tmp_path / "ours.safetensors")), tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    res = ref.load_state_dict(m.to_theirs(ours.state_dict()), strict=False)
    assert sorted(res.missing_keys) == ["paligemma_with_expert.gemma_expert.lm_head.weight",
                                        "paligemma_with_expert.paligemma.lm_head.weight"]
    # policy-checkpoint names ("model." prefix)
    assert "model.action_in_proj.weight" in lerobot_mapping("model.").to_theirs(ours.state_dict())
