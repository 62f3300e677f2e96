"""Logits parity with transformers' LlavaOnevisionForConditionalGeneration on a tiny random config.

Our model is composed from config (our SigLIP x LLaVA MLP projector x the qwen2 LLM family's
GPTModel), loaded from the HF model's state dict through the declarative ``llava_onevision`` layout.
Every sample has two images, so HF takes OneVision's multi-image path: each image is one base tile
(no anyres tiling) followed by the learned newline token -- the path our model implements.
"""

from __future__ import annotations

import torch
from loongforge.model_provider import RunSettings
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.provider import VLMProvider
from omegaconf import OmegaConf, open_dict

REL_TOL = 1e-5
VOCAB, IMAGE = 300, 299


def provider_and_hf(seed: int = 0):
    from loongforge.config import compose_config
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    model = OmegaConf.create(OmegaConf.to_container(compose_config("llava_onevision_tiny").model, resolve=True))
    with open_dict(model):
        model.foundation.vocab_size = VOCAB
        model.image_token_id = IMAGE
    provider = VLMProvider(model)
    cfg = dict(provider.hf_config())
    cfg.pop("architectures"), cfg.pop("model_type")
    torch.manual_seed(seed)
    hf_cfg = LlavaOnevisionConfig(**cfg)
    for c in (hf_cfg, hf_cfg.text_config, hf_cfg.vision_config):
        c._attn_implementation = "eager"
    hf = LlavaOnevisionForConditionalGeneration(hf_cfg).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return provider, hf.eval()


def test_logits_match_hf(mcore, tmp_path, saved_hf_tensors):
    provider, hf = provider_and_hf()
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore).eval()
    sd = saved_hf_tensors(hf, tmp_path / "hf")  # transformers 5 writes vision_tower.* (alias of vision_tower.vision_model.*)
    provider.load_hf_weights(ours, sd.__getitem__)

    processor = provider.image_processor()
    assert processor.num_tokens((1, 4, 4)) == 16 + 1  # 4x4 patches + the newline
    images = [shape_image(70, 40, "red"), shape_image(56, 56, "blue", "circle"),
              shape_image(30, 90, "green", "triangle"), shape_image(112, 112, "orange")]
    pixels = torch.cat([processor(img)[0] for img in images])
    rng = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(2):  # two images per row
        ids = []
        for _ in range(2):
            ids += torch.randint(0, 290, (3,), generator=rng).tolist() + [IMAGE] * 17
        rows.append(ids + torch.randint(0, 290, (4,), generator=rng).tolist())
    ids = torch.tensor(rows)
    seq = ids.shape[1]
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[56, 56]] * 4),
                 batch_num_images=torch.tensor([2, 2])).logits
        logits = ours(ids, torch.arange(seq).expand(2, seq), None, pixel_values=pixels,
                      image_grid_thw=torch.tensor([[1, 4, 4]] * 4))
    rel = ((logits[..., :VOCAB] - ref).norm() / ref.norm()).item()
    print(f"\nllava-onevision parity: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL
    with torch.no_grad():
        text_only = ours(ids, torch.arange(seq).expand(2, seq), None)
    assert (text_only - logits).abs().max() > 1e-3

    # export: the published layout (vision_tower.vision_model.*), which transformers loads to the same logits
    import json

    from safetensors.torch import save_file
    from transformers import LlavaOnevisionForConditionalGeneration

    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in provider.export_hf_weights(ours).items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(provider.hf_config()))
    again = LlavaOnevisionForConditionalGeneration.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        logits2 = again(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[56, 56]] * 4),
                        batch_num_images=torch.tensor([2, 2])).logits
    assert torch.equal(logits2, ref)
