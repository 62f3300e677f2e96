"""loongforge-ckpt's converters on VLM checkpoints, through the ``vlm`` family's ``weight_mapping``
and ``model_cfg_from_hf_config``: a tiny HF checkpoint of each layout -> ours (megatron-core
dist checkpoint) -> HF gives back every tensor bit for bit under the same names."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf, open_dict

CASES = {  # layout: (run config, HF class)
    "qwen2_5_vl": ("qwen2_5_vl_tiny", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwen3_vl_tiny", "Qwen3VLForConditionalGeneration"),
    "llava_onevision": ("llava_onevision_tiny", "LlavaOnevisionForConditionalGeneration"),
    "internvl": ("custom_combined", "InternVLForConditionalGeneration"),
}


@pytest.mark.parametrize("layout", list(CASES))
def test_hf_to_ours_to_hf_bit_identical(tmp_path, layout):
    import transformers
    from loongforge.config import compose_config

    pytest.importorskip("loongforge_ckpt")  # the converters' package (not a dependency of this one)
    from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf
    from loongforge_vlm.provider import VLMProvider
    from safetensors.torch import load_file, save_file

    config, cls = CASES[layout]
    model = OmegaConf.create(OmegaConf.to_container(compose_config(config).model, resolve=True))
    with open_dict(model):
        model.foundation.vocab_size = 300
        model.image_token_id = 299
    cfg = dict(VLMProvider(model).hf_config())
    hf_cls = getattr(transformers, cls)
    torch.manual_seed(0)
    hf = hf_cls(hf_cls.config_class(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    if layout == "llava_onevision":  # published checkpoints keep SigLIP's vision_model level
        tensors = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
        save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})

    convert_hf_to_mcore(src, tmp_path / "ours", log=lambda *_: None)
    section = OmegaConf.load(tmp_path / "ours" / "config.yaml").model
    assert section.family == "vlm" and section.model_type == layout
    assert section.foundation.family == model.foundation.family
    assert section.image_encoder.name == model.image_encoder.name
    convert_mcore_to_hf(tmp_path / "ours", tmp_path / "back", log=lambda *_: None)
    back = load_file(tmp_path / "back" / "model.safetensors")
    ignored = {k for k in tensors if "post_layernorm" in k}  # SigLIP's final norm: unused by LLaVA-OneVision
    assert sorted(back) == sorted(set(tensors) - ignored)
    for name, t in back.items():
        assert torch.equal(t, tensors[name]), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == layout


def test_unsupported_feature_readout_is_refused():
    from loongforge.config import ConfigError
    from loongforge_vlm.hf_config import model_cfg_from_hf_config

    with pytest.raises(ConfigError, match=r"config.json vision_feature_layer=-2"):
        model_cfg_from_hf_config({"model_type": "llava_onevision", "vision_feature_layer": -2,
                                  "text_config": {"model_type": "qwen2"}, "vision_config": {}})
