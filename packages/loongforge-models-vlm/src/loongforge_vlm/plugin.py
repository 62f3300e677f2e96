"""Entry point of ``loongforge-models-vlm`` (entry point ``vlm``).

Registers the ``vlm`` model family (a VLM assembled from config: registered encoder x projector x
any registered LLM family), the vision components (``image_encoder``/``image_projector`` kinds),
the ``vlm_sft`` task, the ``hf_vision`` tokenizer type and the ``models/image_encoder`` /
``models/image_projector`` Hydra groups. Importing this module imports no torch or megatron-core.
"""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import ConfigDir, ModelComponent, ModelFamily, Task, TokenizerType

from loongforge_vlm.model_types import MODEL_TYPES

LOONGFORGE_API_VERSION = "1.1"


@hookimpl
def loongforge_register_models():
    return [
        ModelFamily(
            name="vlm",
            builder="loongforge_vlm.provider:VLMProvider",
            hf_model_types=MODEL_TYPES,
            config_groups=("models/image_encoder", "models/image_projector"),
            description="vision encoder x projector x any registered LLM family, assembled from config",
        )
    ]


@hookimpl
def loongforge_register_model_components():
    return [
        ModelComponent(
            name="qwen2_5_vit",
            kind="image_encoder",
            builder="loongforge_vlm.components.qwen2_5_vit:build",
            description="Qwen2.5-VL vision transformer (window attention, 2D RoPE, RMSNorm, SwiGLU)",
        ),
        ModelComponent(
            name="qwen2_5_merger",
            kind="image_projector",
            builder="loongforge_vlm.components.qwen2_5_merger:build",
            description="Qwen2.5-VL patch merger (2x2 spatial merge -> RMSNorm -> MLP)",
        ),
        ModelComponent(
            name="qwen3_vit",
            kind="image_encoder",
            builder="loongforge_vlm.components.qwen3_vit:build",
            description="Qwen3-VL vision transformer (interpolated learned positions, 2D RoPE, DeepStack taps)",
        ),
        ModelComponent(
            name="qwen3_merger",
            kind="image_projector",
            builder="loongforge_vlm.components.qwen3_merger:build",
            description="Qwen3-VL patch merger plus one DeepStack merger per tapped encoder block",
        ),
        ModelComponent(
            name="siglip",
            kind="image_encoder",
            builder="loongforge_vlm.components.siglip:build",
            description="SigLIP vision transformer (LLaVA-OneVision's encoder; fixed resolution)",
        ),
        ModelComponent(
            name="llava_mlp",
            kind="image_projector",
            builder="loongforge_vlm.components.llava_mlp:build",
            description="LLaVA-OneVision projector (Linear -> GELU -> Linear, newline token after each image)",
        ),
        ModelComponent(
            name="internvit",
            kind="image_encoder",
            builder="loongforge_vlm.components.internvit:build",
            description="InternViT-300M-style vision transformer (CLS token, layer scale; fixed 448 px tiles)",
        ),
        ModelComponent(
            name="internvl_mlp",
            kind="image_projector",
            builder="loongforge_vlm.components.internvl_mlp:build",
            description="InternVL projector (pixel shuffle -> LayerNorm -> Linear -> GELU -> Linear)",
        ),
    ]


@hookimpl
def loongforge_register_tasks():
    return [Task(name="vlm_sft", task="loongforge_vlm.task:VLMTask",
                 description="supervised fine-tuning of a VLM on multimodal conversations (images + text)")]


@hookimpl
def loongforge_register_tokenizers():
    return [TokenizerType(name="hf_vision", loader="loongforge_vlm.data.tokenizer:load_vision_tokenizer",
                          description="an HF tokenizer directory plus the vision tokens (<|vision_start|>, "
                                      "<|image_pad|>, <|vision_end|>) when it lacks them")]


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_vlm.configs", provider="vlm")]
