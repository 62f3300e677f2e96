"""Pi0 mode vs transformers' ``PI0ForConditionalGeneration`` (tiny config, random weights, fp32):
same weights (through the mapping), same noise and time -> same velocities and loss."""

import torch
from loongforge_embodied.flow_matching import FlowMatching
from loongforge_embodied.pi05.config import tiny_config
from loongforge_embodied.pi05.mapping import convert_file, hf_pi0_mapping
from loongforge_embodied.pi05.model import PiModel
from transformers import PI0Config, PI0ForConditionalGeneration

IMAGE_TOKEN = 127


def hf_reference():
    c = tiny_config("pi0", time_features_fp64=False)
    v, g = c.vision, c.vlm
    gemma = dict(model_type="gemma", vocab_size=c.vocab_size, hidden_size=g.width, intermediate_size=g.mlp_dim,
                 num_hidden_layers=g.depth, num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads,
                 head_dim=g.head_dim)
    hf = PI0Config(
        vlm_config=dict(model_type="paligemma", text_config=gemma, projection_dim=g.width, image_token_id=IMAGE_TOKEN,
                        vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                                           intermediate_size=v.intermediate_size, num_hidden_layers=v.depth,
                                           num_attention_heads=v.num_heads, patch_size=v.patch_size,
                                           image_size=v.image_size, vision_use_head=False)),
        dit_config=dict(gemma), chunk_size=c.chunk_size, max_state_dim=c.max_state_dim, max_action_dim=c.max_action_dim)
    torch.manual_seed(0)
    ref = PI0ForConditionalGeneration(hf).eval()
    randomize(ref)
    return c, ref


def randomize(module):
    """Random values everywhere (HF init leaves biases and norm weights at 0)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_pi0_safetensors_round_trip_both_ways(tmp_path):
    """transformers -> ours -> transformers and ours -> transformers -> ours through safetensors
    files (convert_file): every tensor bit-identical."""
    from safetensors.torch import load_file, save_file

    c, ref = hf_reference()
    m = hf_pi0_mapping()
    theirs = {k: v.contiguous() for k, v in ref.state_dict().items() if not m.ignored(k)}
    save_file(theirs, tmp_path / "hf.safetensors")
    convert_file(tmp_path / "hf.safetensors", tmp_path / "ours.safetensors", m, "to_ours")
    convert_file(tmp_path / "ours.safetensors", tmp_path / "back.safetensors", m, "to_theirs")
    back, ours = load_file(tmp_path / "back.safetensors"), load_file(tmp_path / "ours.safetensors")
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    convert_file(tmp_path / "back.safetensors", tmp_path / "ours2.safetensors", m, "to_ours")
    again = load_file(tmp_path / "ours2.safetensors")
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    assert PiModel(c).load_state_dict(ours, strict=True)


def test_pi0_matches_transformers_and_round_trips():
    c, ref = hf_reference()
    mapping = hf_pi0_mapping()
    ours = PiModel(c).eval()
    missing, unexpected = ours.load_state_dict(mapping.to_ours(ref.state_dict()), strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys and unexpected is None

    torch.manual_seed(1)
    b, ncam, ntext = 2, 2, 5
    n_img = c.num_image_tokens
    images = torch.randn(b, ncam, 3, c.vision.image_size, c.vision.image_size)
    text = torch.randint(0, IMAGE_TOKEN, (b, ntext))
    text_mask = torch.ones(b, ntext, dtype=torch.bool)
    text_mask[1, -2:] = False                                      # right padding in the second sample
    state = torch.randn(b, c.max_state_dim)
    actions = torch.randn(b, c.chunk_size, c.max_action_dim)
    noise = torch.randn_like(actions)
    t = torch.tensor([0.3, 0.8])

    input_ids = torch.cat([torch.full((b, ncam * n_img), IMAGE_TOKEN), text], 1)
    attn = torch.cat([torch.ones(b, ncam * n_img, dtype=torch.long), text_mask.long()], 1)
    with torch.no_grad():
        out = ref(state=state, noise=noise, timestep=t, input_ids=input_ids, pixel_values=images,
                  pixel_attention_mask=torch.ones(b, ncam, dtype=torch.bool), attention_mask=attn, actions=actions)
        x_t, u = FlowMatching.interpolate(actions, noise, t)
        v = ours(images, torch.ones(b, ncam, dtype=torch.bool), text, text_mask, x_t, t, state=state)
        loss_sum, n = FlowMatching.loss_sum(v, u, c.max_action_dim)
    assert rel(v, out.logits) < 1e-5
    assert abs(loss_sum.item() / n - out.loss.item()) / out.loss.item() < 1e-5

    # cached-prefix inference path == the joint forward
    with torch.no_grad():
        cache, ppad = ours.prefix_cache(images, torch.ones(b, ncam, dtype=torch.bool), text, text_mask)
        assert rel(ours.velocity_cached(cache, ppad, x_t, t, state=state), v) < 1e-5

    # ours -> transformers names -> ours is bit-identical; the export loads into PI0 with only the
    # unused DiT token embedding missing
    sd = ours.state_dict()
    theirs = mapping.to_theirs(sd)
    back = mapping.to_ours(theirs)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    res = ref.load_state_dict(theirs, strict=False)
    assert res.missing_keys == ["model.dit.embed_tokens.weight"] and not res.unexpected_keys
