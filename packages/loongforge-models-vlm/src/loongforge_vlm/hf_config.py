"""A composed ``model`` section from a VLM's HF ``config.json`` (the inverse of
``VLMProvider.hf_config``), so ``loongforge convert hf-to-mcore`` and ``model.pretrained`` can start
from a published checkpoint directory. Declarative: per layout, which ``vision_config`` /
top-level keys become which encoder / projector keys."""

from __future__ import annotations

from typing import Any

from loongforge.config import ConfigError

#: layout -> (encoder name, {our key: HF vision_config key}), (projector name, {our key: HF top-level key})
SECTIONS: dict[str, tuple[tuple[str, dict[str, str]], tuple[str, dict[str, str]]]] = {
    "qwen2_5_vl": (
        ("qwen2_5_vit", {k: k for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                        "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                                        "fullatt_block_indexes", "hidden_act")}),
        ("qwen2_5_merger", {}),
    ),
    "qwen3_vl": (
        ("qwen3_vit", {k: k for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                      "patch_size", "temporal_patch_size", "spatial_merge_size",
                                      "num_position_embeddings", "deepstack_visual_indexes", "hidden_act")}),
        ("qwen3_merger", {}),
    ),
    "llava_onevision": (
        ("siglip", {"depth": "num_hidden_layers", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                    "num_heads": "num_attention_heads", "image_size": "image_size", "patch_size": "patch_size",
                    "in_channels": "num_channels", "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act"}),
        ("llava_mlp", {"hidden_act": "projector_hidden_act", "bias": "multimodal_projector_bias",
                       "image_grid_pinpoints": "image_grid_pinpoints"}),
    ),
    "internvl": (
        ("internvit", {"depth": "num_hidden_layers", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                       "num_heads": "num_attention_heads", "image_size": "image_size", "patch_size": "patch_size",
                       "in_channels": "num_channels", "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act",
                       "attention_bias": "attention_bias", "layer_scale_init_value": "layer_scale_init_value"}),
        ("internvl_mlp", {"downsample_ratio": "downsample_ratio", "hidden_act": "projector_hidden_act"}),
    ),
}

#: layout -> the feature read-out our encoders implement: (vision_feature_layer, vision_feature_select_strategy)
READOUT = {"llava_onevision": (-1, "full"), "internvl": (-1, "default")}

#: text_config model types that are a registered LLM family's under another name
TEXT_MODEL_TYPES = {"qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}


def _scalar(v):
    """HF vision configs may give sizes as [h, w]; ours are square."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        return v[0]
    return v


def foundation_section(text: dict[str, Any], plugins=None) -> dict[str, Any]:
    """The LLM family's own ``model`` section of ``text_config``."""
    import importlib

    from loongforge.plugins import get_plugin_manager

    plugins = plugins or get_plugin_manager()
    model_type = TEXT_MODEL_TYPES.get(text.get("model_type"), text.get("model_type"))
    families = [n for n, r in plugins.registry().models.items() if model_type in r.hf_model_types and n != "vlm"]
    if len(families) != 1:
        raise ConfigError(f"config.json text_config.model_type {text.get('model_type')!r}: "
                          f"{'no' if not families else 'several'} registered LLM families load it {families}")
    section = {**text, "model_type": model_type, "family": families[0]}
    module = importlib.import_module(plugins.registry().models[families[0]].builder.partition(":")[0])
    normalise = getattr(module, "model_cfg_from_hf_config", None)
    return dict(normalise(section)) if normalise else section


def model_cfg_from_hf_config(hf: dict[str, Any]) -> dict[str, Any]:
    """``model`` section (family ``vlm``) of an HF VLM ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type not in SECTIONS:
        raise ConfigError(f"config.json model_type {model_type!r}: no VLM layout (known: {', '.join(SECTIONS)})")
    (enc_name, enc_keys), (proj_name, proj_keys) = SECTIONS[model_type]
    if model_type in READOUT:
        layer, strategy = READOUT[model_type]
        got = (hf.get("vision_feature_layer", layer), hf.get("vision_feature_select_strategy", strategy))
        if got != (layer, strategy):
            raise ConfigError(f"config.json vision_feature_layer={got[0]}, vision_feature_select_strategy={got[1]!r}: "
                              f"the {model_type} layout reads the last layer ({layer}) with strategy {strategy!r}")
    text = dict(hf.get("text_config") or {})
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    mrope = rope.get("mrope_section") if isinstance(rope, dict) else None
    interleaved = bool(rope.get("mrope_interleaved")) if isinstance(rope, dict) else False
    if mrope:
        text.pop("rope_scaling", None)
        text["rope_parameters"] = {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved")}
    foundation = foundation_section(text)
    vision = hf.get("vision_config") or {}
    encoder = {"name": enc_name, **{ours: _scalar(vision[k]) for ours, k in enc_keys.items() if k in vision}}
    projector = {"name": proj_name, "hidden_size": foundation["hidden_size"],
                 **{ours: hf[k] for ours, k in proj_keys.items() if k in hf}}
    if model_type == "llava_onevision" and str(hf.get("vision_aspect_ratio", "")).startswith("anyres_max_"):
        projector["max_tiles"] = int(hf["vision_aspect_ratio"][len("anyres_max_"):])
    if model_type in ("qwen2_5_vl", "qwen3_vl"):
        projector["spatial_merge_size"] = vision.get("spatial_merge_size", 2)
    image_token = hf.get("image_token_id", hf.get("image_token_index"))
    section = {"family": "vlm", "model_type": model_type, "foundation": foundation, "image_encoder": encoder,
               "image_projector": projector, "mrope_section": list(mrope) if mrope else None,
               "image_token_id": image_token}
    if interleaved:
        section["mrope_interleaved"] = True
    for key in ("video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if hf.get(key) is not None:
            section[key] = hf[key]
    return section
