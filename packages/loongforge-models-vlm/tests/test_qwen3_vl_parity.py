"""Logits parity with transformers' Qwen3VLForConditionalGeneration on a tiny random config
(images; an image plus videos).

Ours is composed from the shipped ``qwen3_vl_tiny`` config (Qwen3-ViT x Qwen3 merger with DeepStack
mergers x the qwen3 LLM family's GPTModel with DeepStack layers and interleaved MRoPE) and loaded
from what the HF model's ``save_pretrained`` writes, through the declarative ``qwen3_vl`` layout.
The images have non-square grids of different sizes, so the position-table interpolation, the 2D
RoPE, the per-image attention spans and the DeepStack scatter over two batch rows all matter.
"""

from __future__ import annotations

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge_vlm.data.positions import mrope_positions
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.provider import VLMProvider
from omegaconf import OmegaConf, open_dict

REL_TOL = 1e-5
VOCAB = 300
IMAGE, VIDEO, START, END = 299, 296, 297, 298


@pytest.fixture(scope="module")
def tiny_section():
    from loongforge.config import compose_config

    model = OmegaConf.create(OmegaConf.to_container(compose_config("qwen3_vl_tiny").model, resolve=True))
    with open_dict(model):
        model.foundation.vocab_size = VOCAB
        model.image_token_id, model.video_token_id = IMAGE, VIDEO
        model.vision_start_token_id, model.vision_end_token_id = START, END
    return model


def hf_reference(provider: VLMProvider, seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = {k: v for k, v in provider.hf_config().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    hf_cfg = Qwen3VLConfig(**cfg)
    for c in (hf_cfg, hf_cfg.text_config, hf_cfg.vision_config):
        c._attn_implementation = "eager"
    model = Qwen3VLForConditionalGeneration(hf_cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model.eval()


def build_ours(provider, mcore, hf, tmp_path, saved_hf_tensors):
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore).eval()
    provider.load_hf_weights(ours, saved_hf_tensors(hf, tmp_path).__getitem__)
    return ours


def sample(processor, images, rng):
    ids, patches, grids = [], [], []
    for img in images:
        p, grid = processor(img)
        ids += torch.randint(0, 290, (3,), generator=rng).tolist()
        ids += [START] + [IMAGE] * processor.num_tokens(grid) + [END]
        patches.append(p)
        grids.append(grid)
    ids += torch.randint(0, 290, (5,), generator=rng).tolist()
    return ids, patches, grids


def test_logits_match_hf(mcore, tiny_section, tmp_path, saved_hf_tensors):
    provider = VLMProvider(tiny_section)
    assert provider.num_deepstack == 2 and provider.mrope_interleaved
    hf = hf_reference(provider)
    ours = build_ours(provider, mcore, hf, tmp_path, saved_hf_tensors)
    processor = provider.image_processor()
    assert processor.patch_size == 16 and processor.image_mean == (0.5, 0.5, 0.5)
    rng = torch.Generator().manual_seed(1)
    # merged grids 3x2 and 2x2, then 2x4
    rows = [sample(processor, [shape_image(192, 128, "red"), shape_image(64, 64, "blue", "circle")], rng),
            sample(processor, [shape_image(128, 256, "green")], rng)]
    seq = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [0] * (seq - len(r[0])) for r in rows])
    pixels = torch.cat([p for r in rows for p in r[1]])
    grid_thw = torch.tensor([g for r in rows for g in r[2]])
    mrope = torch.stack([mrope_positions(ids[b], rows[b][2], IMAGE, 2) for b in range(2)])  # [b, 3, s]

    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid_thw,
                 mm_token_type_ids=(ids == IMAGE).int()).logits
        hf_pos, _ = hf.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=grid_thw)
        logits = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels, image_grid_thw=grid_thw,
                      mrope_position_ids=mrope)
    assert torch.equal(mrope.transpose(0, 1), hf_pos)
    rel = ((logits[..., :VOCAB] - ref).norm() / ref.norm()).item()
    print(f"\nqwen3-vl parity: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL

    # DeepStack matters: without it (mergers' outputs dropped) the logits move
    with torch.no_grad():
        merged = ours.image_projector
        saved = [m.linear_fc2.weight.clone() for m in merged.deepstack_merger_list]
        for m in merged.deepstack_merger_list:
            m.linear_fc2.weight.zero_(), m.linear_fc2.bias.zero_()
        no_deepstack = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels,
                            image_grid_thw=grid_thw, mrope_position_ids=mrope)
        for m, w in zip(merged.deepstack_merger_list, saved, strict=True):
            m.linear_fc2.weight.copy_(w)
    assert (no_deepstack - logits).abs().max() > 1e-3


def test_interleaved_mrope_axes():
    """Qwen3-VL's layout of [24, 20, 20] over 64 rotary dims: t h w t h w ..., the last 4 dims time."""
    from loongforge_vlm.model import mrope_axes

    axes = mrope_axes((24, 20, 20), interleaved=True)
    assert axes[:6].tolist() == [0, 1, 2, 0, 1, 2] and axes[60:].tolist() == [0, 0, 0, 0]
    assert [(axes == a).sum().item() for a in range(3)] == [24, 20, 20]
    assert mrope_axes((2, 3, 3), interleaved=False).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]


def test_hf_round_trip_bit_identical(mcore, tiny_section, tmp_path, saved_hf_tensors):
    provider = VLMProvider(tiny_section)
    hf = hf_reference(provider, seed=3)
    ours = build_ours(provider, mcore, hf, tmp_path, saved_hf_tensors)
    sd = saved_hf_tensors(hf, tmp_path)  # the published names (model.visual.*, model.language_model.*)
    assert any(k.startswith("model.visual.deepstack_merger_list.1.") for k in sd)
    back = provider.export_hf_weights(ours)
    assert sorted(back) == sorted(sd)
    for name, t in sd.items():
        assert torch.equal(back[name], t), name


def test_deepstack_needs_its_layers_on_the_first_stage(mcore, tiny_section):
    from loongforge.config import ConfigError

    model = tiny_section.copy()
    with open_dict(model):
        model.image_encoder.deepstack_visual_indexes = [0, 1, 2]
    provider = VLMProvider(model)
    assert provider.num_deepstack == 3
    run = RunSettings()
    with pytest.raises(ConfigError, match="first 3 LLM layers"):  # the tiny LLM has 2 layers
        provider.build(provider.transformer_config(run), run, backend=mcore)


def test_video_logits_match_hf(mcore, tiny_section, tmp_path, saved_hf_tensors):
    """Row 0: an image and a 4-frame clip; row 1: another clip; each frame behind its timestamp text."""
    import numpy as np
    from loongforge_vlm.data.video import Qwen3VideoProcessor, write_video

    provider = VLMProvider(tiny_section)
    hf = hf_reference(provider)
    ours = build_ours(provider, mcore, hf, tmp_path, saved_hf_tensors)
    images = provider.image_processor()
    videos = Qwen3VideoProcessor(fps=2.0, min_pixels=0, max_pixels=10**9)
    rng = torch.Generator().manual_seed(4)

    def text(n):
        return torch.randint(0, 290, (n,), generator=rng).tolist()

    rows, pixels, grids, vpixels, vgrids = [], [], [], [], []
    for spec in (["image", ("v0", 20, 64, 96)], [("v1", 12, 96, 64)]):  # row 0: image + clip, row 1: clip
        ids = text(3)
        for item in spec:
            if item == "image":
                p, g = images(shape_image(96, 64, "red"))
                ids += [START] + [IMAGE] * images.num_tokens(g) + [END] + text(2)
                pixels.append(p), grids.append(g)
                continue
            name, n, h, w = item
            write_video(tmp_path / f"{name}.mkv", np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8), fps=10)
            p, g, times = videos(tmp_path / f"{name}.mkv")
            for _ in times:  # each frame: timestamp text (random ids stand in for it), start, tokens, end
                ids += text(4) + [START] + [VIDEO] * videos.num_tokens((1, *g[1:])) + [END]
            vpixels.append(p), vgrids.append(g)
        rows.append(ids + text(3))
    assert vgrids == [(2, 4, 6), (2, 6, 4)]  # 4 frames each (2 s at fps 2; min_frames 4)
    seq = max(map(len, rows))
    ids = torch.tensor([r + [0] * (seq - len(r)) for r in rows])
    pixels, grid_thw = torch.cat(pixels), torch.tensor(grids)
    vpixels, video_grid_thw = torch.cat(vpixels), torch.tensor(vgrids)
    kinds = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    mrope = torch.stack([mrope_positions(ids[0], grids, IMAGE, 2, video_token_id=VIDEO, video_grid_thw=vgrids[:1]),
                         mrope_positions(ids[1], [], IMAGE, 2, video_token_id=VIDEO, video_grid_thw=vgrids[1:])])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid_thw, pixel_values_videos=vpixels,
                 video_grid_thw=video_grid_thw, mm_token_type_ids=kinds).logits
        hf_pos, _ = hf.model.get_rope_index(ids, kinds, image_grid_thw=grid_thw, video_grid_thw=video_grid_thw)
        logits = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels, image_grid_thw=grid_thw,
                      pixel_values_videos=vpixels, video_grid_thw=video_grid_thw, mrope_position_ids=mrope)
    assert torch.equal(mrope.transpose(0, 1), hf_pos)
    rel = ((logits[..., :VOCAB] - ref).norm() / ref.norm()).item()
    print(f"\nqwen3-vl video parity: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL
    with torch.no_grad():  # the videos matter
        no_video = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels, image_grid_thw=grid_thw,
                        mrope_position_ids=mrope)
    assert (no_video - logits).abs().max() > 1e-3


PUBLISHED = {  # Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json: text (hidden, layers, heads, kv, ffn, tied), vision
    "qwen3_vl_2b": ((2048, 28, 16, 8, 6144, True), (24, 1024, 4096, [5, 11, 17])),
    "qwen3_vl_4b": ((2560, 36, 32, 8, 9728, True), (24, 1024, 4096, [5, 11, 17])),
    "qwen3_vl_8b": ((4096, 36, 32, 8, 12288, False), (27, 1152, 4304, [8, 16, 24])),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_size_configs_match_the_published_configs(name):
    """The shipped size configs export the published config.json values, which transformers accepts."""
    from loongforge.config import compose_config
    from transformers import Qwen3VLConfig

    cfg = VLMProvider(compose_config(name).model).hf_config()
    hf = Qwen3VLConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    t, v = hf.text_config, hf.vision_config
    text, vision = PUBLISHED[name]
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            hf.tie_word_embeddings) == text
    assert (v.depth, v.hidden_size, v.intermediate_size, list(v.deepstack_visual_indexes)) == vision
    assert v.out_hidden_size == t.hidden_size and t.head_dim == 128 and t.max_position_embeddings == 262144
    assert t.rope_parameters["rope_theta"] == 5000000.0 and t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert t.rope_parameters["mrope_interleaved"] and (hf.image_token_id, hf.video_token_id) == (151655, 151656)


def test_deepstack_through_megatron_recompute(mcore, tiny_section):
    """Full activation recompute (megatron-core's checkpointed block, one layer per chunk) carries the
    DeepStack tensor through ``context``: same loss and gradients, the encoder's included."""
    provider = VLMProvider(tiny_section)
    processor = provider.image_processor()
    ids, patches, grids = sample(processor, [shape_image(128, 96, "red"), shape_image(64, 64, "blue")],
                                 torch.Generator().manual_seed(2))
    ids = torch.tensor([ids])
    seq = ids.shape[1]
    inputs = dict(pixel_values=torch.cat(patches), image_grid_thw=torch.tensor(grids),
                  mrope_position_ids=mrope_positions(ids[0], grids, IMAGE, 2)[None])
    results = []
    for recompute in (None, "full"):
        run = RunSettings(recompute_granularity=recompute, recompute_method="uniform" if recompute else None,
                          recompute_num_layers=1 if recompute else None)
        torch.manual_seed(0)
        model = provider.build(provider.transformer_config(run), run, backend=mcore).train()
        loss = model(ids, torch.arange(seq)[None], None, labels=ids, **inputs).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and any("deepstack_merger_list" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    assert g0["image_projector.deepstack_merger_list.0.linear_fc2.weight"].abs().sum() > 0


def test_deepstack_spec_accepts_layer_and_block_specs():
    """A backend may give one layer spec or a block spec with one spec per layer (per-layer kernels)."""
    from loongforge.modules.layer_spec import local_sdpa_spec
    from loongforge_vlm.deepstack import DeepStackMixin, with_deepstack
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    layer = local_sdpa_spec(TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2))
    assert issubclass(with_deepstack(layer).module, DeepStackMixin)
    block = ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=[layer, layer]))
    out = with_deepstack(block)
    assert out.module is TransformerBlock and all(issubclass(s.module, DeepStackMixin) for s in out.submodules.layer_specs)
    with pytest.raises(TypeError, match="TransformerLayer or TransformerBlock"):
        with_deepstack(ModuleSpec(module=torch.nn.Linear))
