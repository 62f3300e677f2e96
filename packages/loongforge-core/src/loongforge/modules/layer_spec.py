"""Transformer layer specs built from megatron-core's local modules with SDPA core attention."""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from loongforge.modules.attention import SDPAttention
from loongforge.modules.norm import LocalHeadNorm, LocalNorm


def local_sdpa_layer_spec(qk_layernorm: bool = False, core_attention: type = SDPAttention) -> ModuleSpec:
    """megatron-core's local GPT layer (RMSNorm) with ``core_attention`` swapped for SDPA and the
    norms for :mod:`loongforge.modules.norm`'s (torch norms that also allow sequence parallelism)."""
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    attn = spec.submodules.self_attention
    head_norm = LocalHeadNorm if qk_layernorm else IdentityOp
    attn_sub = dataclasses.replace(attn.submodules, core_attention=core_attention,
                                   q_layernorm=head_norm, k_layernorm=head_norm)
    attn = dataclasses.replace(attn, submodules=attn_sub)
    layer_sub = dataclasses.replace(spec.submodules, self_attention=attn,
                                    input_layernorm=LocalNorm, pre_mlp_layernorm=LocalNorm)
    return dataclasses.replace(spec, submodules=layer_sub)


def _uneven_split(config) -> str | None:
    """Why a block spec (a fixed number of layers per model chunk) cannot hold ``config``'s
    pipeline split, or None."""
    uneven = [f for f in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                          "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                          "account_for_loss_in_pipeline_split") if getattr(config, f, None)]
    if uneven:
        return f"TransformerConfig sets {', '.join(uneven)}"
    stages = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
    if config.num_layers % stages:
        return f"num_layers={config.num_layers} is not divisible by pp x vpp = {stages}"
    return None


def local_sdpa_spec(config, qk_layernorm: bool | None = None, core_attention: type = SDPAttention,
                    prefer_block: bool = False) -> ModuleSpec:
    """The spec ``GPTModel(transformer_layer_spec=...)`` takes for ``config``.

    Without sequence parallelism: :func:`local_sdpa_layer_spec`. With it, a ``TransformerBlock``
    spec around that layer whose final norm is :class:`LocalNorm` too: given a layer spec,
    megatron-core builds the final norm from its module-level ``LayerNormImpl``, which (without
    Apex or Transformer Engine) refuses sequence parallelism. A block spec fixes the number of
    layers per model chunk, so it needs the even pipeline split ``parallel.validate_layout``
    enforces (``num_layers`` divisible by pp x vpp, no first/last-stage overrides).
    ``prefer_block``: the block spec also without sequence parallelism where the split allows it
    (a backend then swaps the final norm like the layers' norms).
    """
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    qk = bool(getattr(config, "qk_layernorm", False)) if qk_layernorm is None else qk_layernorm
    layer = local_sdpa_layer_spec(qk_layernorm=qk, core_attention=core_attention)
    uneven = _uneven_split(config)
    if not getattr(config, "sequence_parallel", False) and not (prefer_block and uneven is None):
        return layer
    if uneven:
        raise ValueError(f"sequence parallelism on the local spec needs an even pipeline split; {uneven}")
    stages = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
    block = TransformerBlockSubmodules(layer_specs=[layer] * (config.num_layers // stages), layer_norm=LocalNorm)
    return ModuleSpec(module=TransformerBlock, submodules=block)
