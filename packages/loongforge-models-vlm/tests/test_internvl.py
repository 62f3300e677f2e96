"""InternViT + pixel-shuffle projector: logits parity with transformers' InternVLForConditionalGeneration
(tiny random config; Qwen2 LLM as in InternVL 2.5/3, Qwen3 LLM as in InternVL3.5), pixel shuffle properties, and the
``custom_combined`` config (InternViT x Qwen3) training from ``loongforge run``."""

from __future__ import annotations

import re

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge_vlm.components.internvl_mlp import pixel_shuffle, pixel_unshuffle
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.provider import VLMProvider
from omegaconf import OmegaConf, open_dict

REL_TOL = 1e-5
VOCAB, IMAGE = 300, 299


def test_pixel_shuffle_is_invertible_and_groups_blocks():
    x = torch.randn(2, 6, 4, 5)
    y = pixel_shuffle(x, 2)
    assert y.shape == (2, 3, 2, 20)
    assert torch.equal(pixel_unshuffle(y, 2), x)
    # token (1, 1) holds the 2x2 block at rows 2-3, cols 2-3, row-major
    assert torch.equal(y[0, 1, 1], torch.cat([x[0, 2, 2], x[0, 2, 3], x[0, 3, 2], x[0, 3, 3]]))
    assert torch.equal(pixel_shuffle(x, 1), x)


@pytest.mark.parametrize("llm", ["qwen2.5", "qwen3"])
def test_logits_match_hf(mcore, tmp_path, saved_hf_tensors, llm):
    """InternVL 2.5/3 pair InternViT with Qwen2.5; InternVL3.5 with Qwen3 (QK-norm, head_dim 32)."""
    from loongforge.config import compose_config
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    model = OmegaConf.create(OmegaConf.to_container(compose_config("custom_combined").model, resolve=True))
    with open_dict(model):
        if llm == "qwen2.5":
            model.foundation = OmegaConf.to_container(compose_config("qwen2_5_vl_tiny").model.foundation, resolve=True)
        model.foundation.vocab_size = VOCAB
        model.image_token_id = IMAGE
    provider = VLMProvider(model)
    cfg = dict(provider.hf_config())
    cfg.pop("architectures"), cfg.pop("model_type")
    torch.manual_seed(0)
    hf_cfg = InternVLConfig(**cfg)
    for c in (hf_cfg, hf_cfg.text_config, hf_cfg.vision_config):
        c._attn_implementation = "eager"
    hf = InternVLForConditionalGeneration(hf_cfg).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "lambda" in name else 0.05 * torch.randn_like(p))
    hf.eval()
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore).eval()
    sd = saved_hf_tensors(hf, tmp_path)
    provider.load_hf_weights(ours, sd.__getitem__)

    processor = provider.image_processor()
    assert processor.num_tokens((1, 4, 4)) == 4  # 4x4 patches, pixel-shuffled by 2
    images = [shape_image(70, 40, "red"), shape_image(56, 56, "blue", "circle"), shape_image(30, 90, "green")]
    pixels = torch.cat([processor(img)[0] for img in images])
    rng = torch.Generator().manual_seed(1)
    rows = [[1, 2, IMAGE, IMAGE, IMAGE, IMAGE, 5] + [IMAGE] * 4 + [7, 8],
            [9] + [IMAGE] * 4 + torch.randint(0, 290, (8,), generator=rng).tolist()]
    ids = torch.tensor(rows)
    seq = ids.shape[1]
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        logits = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels)
    rel = ((logits[..., :VOCAB] - ref).norm() / ref.norm()).item()
    assert hf_cfg.text_config.model_type == {"qwen2.5": "qwen2", "qwen3": "qwen3"}[llm]
    print(f"\ninternvl ({llm}) parity: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL
    back = provider.export_hf_weights(ours)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[n], t) for n, t in sd.items())


def test_custom_combined_trains_from_loongforge_run(tmp_path):
    from loongforge.testing import run_cli

    out = run_cli("run", "custom_combined", f"output_dir={tmp_path}", "train.steps=6", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "vlm data: 64 conversations with 64 images; 0 skipped" in text
    first, last = map(float, re.search(r"loss: ([\d.]+) \(first step\) -> ([\d.]+) \(step 6\)", text).groups())
    assert last < first - 0.5, (first, last)
