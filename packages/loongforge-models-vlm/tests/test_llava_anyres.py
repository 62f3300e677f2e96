"""LLaVA-OneVision anyres tiling of a single image: preprocessing equal to transformers'
LlavaOnevisionImageProcessorPil (tiles, padding, base tile), token counts equal to its processor's,
and logits parity with LlavaOnevisionForConditionalGeneration on single-image samples, with and
without the ``anyres_max`` shrink."""

from __future__ import annotations

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.provider import VLMProvider
from omegaconf import OmegaConf, open_dict

REL_TOL = 1e-5
VOCAB, IMAGE = 300, 299
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]  # tiles of the tiny SigLIP's 56 px
SIZES = [(40, 90), (120, 70), (56, 56), (30, 160), (100, 100)]  # (height, width)


def section(max_tiles: int):
    from loongforge.config import compose_config

    model = OmegaConf.create(OmegaConf.to_container(compose_config("llava_onevision_tiny").model, resolve=True))
    with open_dict(model):
        model.foundation.vocab_size = VOCAB
        model.image_token_id = IMAGE
        model.image_projector.image_grid_pinpoints = PINPOINTS
        model.image_projector.max_tiles = max_tiles
    return model


def test_preprocessing_and_token_counts_match_hf():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    processor = VLMProvider(section(9)).image_processor()
    hf = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=PINPOINTS, size={"height": 56, "width": 56},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for max_tiles in (9, 1):
        counter = type("P", (), {"image_processor": hf, "num_image_tokens": 16,  # 4x4 patches, no CLS
                                 "vision_aspect_ratio": f"anyres_max_{max_tiles}",
                                 "_get_unpadded_features": LlavaOnevisionProcessor._get_unpadded_features})()
        geo = VLMProvider(section(max_tiles)).image_processor()
        for h, w in SIZES:
            assert geo.num_tokens(geo.grid(h, w)) == LlavaOnevisionProcessor._get_number_of_features(
                counter, h, w, 56, 56), (h, w)
    for h, w in SIZES:
        img = shape_image(w, h, "red", "circle")
        pixels, grid = processor(img)
        ref = hf(images=[img], return_tensors="pt")
        assert grid[0] == ref["pixel_values"].shape[1] and list(ref["image_sizes"][0]) == [h, w]
        torch.testing.assert_close(pixels, ref["pixel_values"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("max_tiles", [9, 1])
def test_logits_match_hf(mcore, tmp_path, saved_hf_tensors, max_tiles):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    provider = VLMProvider(section(max_tiles))
    cfg = {k: v for k, v in provider.hf_config().items() if k not in ("architectures", "model_type")}
    assert cfg["vision_aspect_ratio"] == f"anyres_max_{max_tiles}"
    torch.manual_seed(0)
    hf_cfg = LlavaOnevisionConfig(**cfg)
    for c in (hf_cfg, hf_cfg.text_config, hf_cfg.vision_config):
        c._attn_implementation = "eager"
    hf = LlavaOnevisionForConditionalGeneration(hf_cfg).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    hf.eval()
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore).eval()
    provider.load_hf_weights(ours, saved_hf_tensors(hf, tmp_path).__getitem__)

    processor = provider.image_processor()
    images = [shape_image(90, 40, "red"), shape_image(70, 120, "blue", "circle")]  # 1x2 and 2x1 tiles
    out = [processor(img) for img in images]
    pixels = torch.cat([p for p, _ in out])
    grids = torch.tensor([g for _, g in out])
    rng = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 290, (3,), generator=rng).tolist() + [IMAGE] * processor.num_tokens(g)
            + torch.randint(0, 290, (4,), generator=rng).tolist() for _, g in out]
    seq = max(map(len, rows))
    ids = torch.tensor([r + [0] * (seq - len(r)) for r in rows])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_sizes=grids[:, 1:], batch_num_images=torch.tensor([1, 1]),
                 vision_aspect_ratio=f"anyres_max_{max_tiles}").logits
        logits = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels, image_grid_thw=grids)
    rel = ((logits[..., :VOCAB] - ref).norm() / ref.norm()).item()
    print(f"\nllava-onevision anyres (max {max_tiles}) parity: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL
