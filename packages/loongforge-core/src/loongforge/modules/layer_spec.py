"""Transformer layer specs built from megatron-core's local modules with SDPA core attention."""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from loongforge.modules.attention import SDPAttention


def local_sdpa_layer_spec(qk_layernorm: bool = False, core_attention: type = SDPAttention) -> ModuleSpec:
    """megatron-core's local GPT layer (RMSNorm) with ``core_attention`` swapped for SDPA."""
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    attn = spec.submodules.self_attention
    attn_sub = dataclasses.replace(attn.submodules, core_attention=core_attention)
    attn = dataclasses.replace(attn, submodules=attn_sub)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))
