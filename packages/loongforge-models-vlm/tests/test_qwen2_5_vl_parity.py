"""Logits parity with transformers' Qwen2_5_VLForConditionalGeneration on a tiny random config.

Our model is composed from config (Qwen2.5-ViT x merger x the qwen2 LLM family's GPTModel with
multimodal RoPE), loaded from the HF model's state dict through the declarative layout in
``loongforge_vlm.model_types``; same images, same text, fp32 on CPU. The images have sizes whose
merged grids are not multiples of the attention window, so partial windows are exercised.
"""

from __future__ import annotations

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge_vlm.data.positions import mrope_positions
from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.provider import VLMProvider
from omegaconf import OmegaConf, open_dict

REL_TOL = 1e-5
VOCAB = 300
IMAGE, START, END = 299, 297, 298


def tiny_model_section(tiny_cfg):
    model = OmegaConf.create(OmegaConf.to_container(tiny_cfg.model, resolve=True))
    with open_dict(model):
        model.foundation.vocab_size = VOCAB
        model.image_token_id = IMAGE
        model.vision_start_token_id = START
        model.vision_end_token_id = END
    return model


def hf_reference(provider: VLMProvider, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = dict(provider.hf_config())
    cfg.pop("architectures"), cfg.pop("model_type")
    torch.manual_seed(seed)
    hf_cfg = Qwen2_5_VLConfig(**cfg)
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.05 * torch.randn_like(p))
    return model.eval()


def sample(processor, images, rng):
    """Text ids with each image's placeholder tokens, and the images' patches and grids."""
    ids, patches, grids = [], [], []
    for img in images:
        p, grid = processor(img)
        ids += torch.randint(0, 290, (3,), generator=rng).tolist()
        ids += [START] + [IMAGE] * processor.num_tokens(grid) + [END]
        patches.append(p)
        grids.append(grid)
    ids += torch.randint(0, 290, (5,), generator=rng).tolist()
    return ids, patches, grids


def test_logits_match_hf(mcore, tiny_cfg, tmp_path, saved_hf_tensors):
    provider = VLMProvider(tiny_model_section(tiny_cfg))
    assert provider.mrope_section == (2, 3, 3)  # auto: head_dim 16 -> 8 rotary dims
    hf = hf_reference(provider)
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore).eval()
    sd = saved_hf_tensors(hf, tmp_path)
    provider.load_hf_weights(ours, sd.__getitem__)

    processor = Qwen2_5ImageProcessor.from_encoder_section(provider.encoder_cfg)
    rng = torch.Generator().manual_seed(1)
    # grids (merged): 3x5 and 2x2, then 4x3 -- windows of 2x2 merged tokens, partial at the edges
    rows = [sample(processor, [shape_image(140, 84, "red"), shape_image(56, 56, "blue", "circle")], rng),
            sample(processor, [shape_image(84, 112, "green")], rng)]
    seq = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [0] * (seq - len(r[0])) for r in rows])  # right padding (masked out by causality)
    pixels = torch.cat([p for r in rows for p in r[1]])
    grid_thw = torch.tensor([g for r in rows for g in r[2]])
    mrope = torch.stack([mrope_positions(ids[b], [g for g in rows[b][2]], IMAGE, 2) for b in range(2)])  # [b, 3, s]

    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid_thw,
                 mm_token_type_ids=(ids == IMAGE).int()).logits
        hf_pos, _ = hf.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=grid_thw)
        logits = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels, image_grid_thw=grid_thw,
                      mrope_position_ids=mrope)
    assert torch.equal(mrope.transpose(0, 1), hf_pos)
    rel = ((logits[..., :VOCAB] - ref).norm() / ref.norm()).item()
    print(f"\nqwen2.5-vl parity: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL

    # the image part matters: without the pixels the logits at and after the images differ
    with torch.no_grad():
        text_only = ours(ids, torch.arange(seq).expand(2, seq), None, mrope_position_ids=mrope)
    assert (text_only - logits).abs().max() > 1e-3


def test_preprocessing_matches_hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ours = Qwen2_5ImageProcessor(min_pixels=3136, max_pixels=20000)
    hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=20000)
    for size in [(140, 84), (30, 30), (400, 90), (57, 113)]:  # as is, upscaled, downscaled, rounded
        img = shape_image(*size, "orange", "circle")
        patches, grid = ours(img)
        ref = hf(images=[img], return_tensors="pt")
        assert list(ref["image_grid_thw"][0]) == list(grid)
        torch.testing.assert_close(patches, ref["pixel_values"], rtol=0, atol=1e-5)


def test_projector_size_mismatch_names_the_key(tiny_cfg):
    from loongforge.config import ConfigError

    model = tiny_model_section(tiny_cfg)
    model.image_projector.hidden_size = 65
    with pytest.raises(ConfigError, match="model.image_projector.hidden_size"):
        VLMProvider(model)


def test_hf_round_trip_bit_identical(mcore, tiny_cfg, tmp_path, saved_hf_tensors):
    provider = VLMProvider(tiny_model_section(tiny_cfg))
    hf = hf_reference(provider, seed=3)
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore)
    sd = saved_hf_tensors(hf, tmp_path)  # the published checkpoint names (visual.*, model.layers.*)
    provider.load_hf_weights(ours, sd.__getitem__)
    back = provider.export_hf_weights(ours)
    assert sorted(back) == sorted(sd)
    for name, t in sd.items():
        assert torch.equal(back[name], t), name


def test_freeze_options(mcore, tiny_cfg):
    """``model.image_encoder.freeze=true``: the encoder gets no gradients (megatron's DDP and the
    optimizer then never see it) while the projector and the LLM still train."""
    model_cfg = tiny_model_section(tiny_cfg)
    model_cfg.image_encoder.freeze = True
    provider = VLMProvider(model_cfg)
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore)
    processor = Qwen2_5ImageProcessor.from_encoder_section(provider.encoder_cfg)
    ids, patches, grids = sample(processor, [shape_image(56, 84, "red")], torch.Generator().manual_seed(0))
    ids = torch.tensor([ids])
    mrope = mrope_positions(ids[0], grids, IMAGE, 2)[None]
    seq = ids.shape[1]
    loss = ours(ids, torch.arange(seq)[None], None, labels=ids, pixel_values=torch.cat(patches),
                image_grid_thw=torch.tensor(grids), mrope_position_ids=mrope).sum()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in ours.image_encoder.parameters())
    assert all(p.grad is not None for p in ours.image_projector.parameters())
    assert ours.language_model.decoder.layers[0].self_attention.linear_qkv.weight.grad is not None
