"""HF checkpoint layouts of the VLM families (no torch import).

Each layout says, declaratively, where our parameters live in the HF checkpoint: prefix renames
tried in order (first match wins) for the vision parts (``image_encoder.*``, ``image_projector.*``),
and the prefix that replaces ``model.`` in the LLM family's own HF names (the LLM's rules do the
rest: fused q/k/v, gate/up, vocabulary padding).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VLMLayout:
    model_type: str
    hf_architecture: str
    #: (ours prefix, HF prefix) for the vision parts, first match wins
    vision_renames: tuple[tuple[str, str], ...]
    #: HF prefix of the LLM's decoder (``model.layers.0...`` -> ``{llm_prefix}layers.0...``)
    llm_prefix: str
    #: HF prefix of the LLM's output layer
    lm_head_prefix: str = "lm_head."
    #: (prefix, alternative) for vision names some writers of the format use; tried when missing
    hf_aliases: tuple[tuple[str, str], ...] = ()
    #: HF tensors (regular expressions) the model deliberately does not use
    ignore_hf: tuple[str, ...] = ()
    #: the tokens the data pipeline writes around / for each image ("" = none)
    image_token: str = "<|image_pad|>"
    video_token: str = ""
    vision_start_token: str = "<|vision_start|>"
    vision_end_token: str = "<|vision_end|>"

    def vision_hf_name(self, ours: str) -> str:
        for prefix, hf in self.vision_renames:
            if ours.startswith(prefix):
                return hf + ours[len(prefix):]
        raise KeyError(f"{ours!r} has no HF name in the {self.model_type} layout")

    def vision_hf_candidates(self, ours: str) -> list[str]:
        """The checkpoint name of ``ours``, then its aliases."""
        name = self.vision_hf_name(ours)
        return [name] + [alt + name[len(prefix):] for prefix, alt in self.hf_aliases if name.startswith(prefix)]

    def llm_hf_name(self, llm_hf: str) -> str:
        """The checkpoint name of an LLM-family HF name (``model.norm.weight``, ``lm_head.weight``)."""
        if llm_hf.startswith("lm_head."):
            return self.lm_head_prefix + llm_hf[len("lm_head."):]
        if llm_hf.startswith("model."):
            return self.llm_prefix + llm_hf[len("model."):]
        return llm_hf


LAYOUTS: dict[str, VLMLayout] = {
    # the names of the published checkpoints (and of transformers' save_pretrained)
    "qwen2_5_vl": VLMLayout(
        model_type="qwen2_5_vl",
        hf_architecture="Qwen2_5_VLForConditionalGeneration",
        vision_renames=(
            ("image_encoder.patch_embed.weight", "visual.patch_embed.proj.weight"),
            ("image_encoder.", "visual."),
            ("image_projector.", "visual.merger."),
        ),
        llm_prefix="model.",
    ),
    # Qwen3VLForConditionalGeneration: the ViT's main merger and DeepStack mergers sit in ``visual``
    "qwen3_vl": VLMLayout(
        model_type="qwen3_vl",
        hf_architecture="Qwen3VLForConditionalGeneration",
        vision_renames=(
            ("image_encoder.patch_embed.", "model.visual.patch_embed.proj."),
            ("image_encoder.", "model.visual."),
            ("image_projector.deepstack_merger_list.", "model.visual.deepstack_merger_list."),
            ("image_projector.", "model.visual.merger."),
        ),
        llm_prefix="model.language_model.",
        video_token="<|video_pad|>",
    ),
    # LlavaOnevisionForConditionalGeneration: SigLIP tower, 2-layer MLP, image newline
    "llava_onevision": VLMLayout(
        model_type="llava_onevision",
        hf_architecture="LlavaOnevisionForConditionalGeneration",
        vision_renames=(
            ("image_encoder.layers.", "vision_tower.vision_model.encoder.layers."),
            ("image_encoder.", "vision_tower.vision_model."),
            ("image_projector.image_newline", "image_newline"),
            ("image_projector.", "multi_modal_projector."),
        ),
        # transformers 5 saves the SigLIP tower without its ``vision_model.`` level
        hf_aliases=(("vision_tower.vision_model.", "vision_tower."),),
        llm_prefix="language_model.model.",
        lm_head_prefix="language_model.lm_head.",
        ignore_hf=(r"vision_tower\.(vision_model\.)?post_layernorm\..*", r"vision_tower\.(vision_model\.)?head\..*"),
        image_token="<image>", vision_start_token="", vision_end_token="",
    ),
    # InternVLForConditionalGeneration (InternVL 2.5 / 3 "-hf" checkpoints)
    "internvl": VLMLayout(
        model_type="internvl",
        hf_architecture="InternVLForConditionalGeneration",
        vision_renames=(
            ("image_encoder.layers.", "vision_tower.encoder.layer."),
            ("image_encoder.", "vision_tower."),
            ("image_projector.", "multi_modal_projector."),
        ),
        llm_prefix="language_model.model.",
        lm_head_prefix="language_model.lm_head.",
        image_token="<IMG_CONTEXT>", vision_start_token="<img>", vision_end_token="</img>",
    ),
}

MODEL_TYPES = tuple(LAYOUTS)
