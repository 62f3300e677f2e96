"""The layer specs of an MoE decoder: the backend's dense spec with the MLP of the MoE layers
swapped for megatron-core's ``MoELayer`` (``TopKRouter``, the configured token dispatcher, and
:class:`GroupedExperts` or megatron's ``SequentialMLP``)."""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.transformer.spec_utils import ModuleSpec


def experts_builder(grouped_gemm: bool):
    """``MoESubmodules.experts``: ours (one grouped GEMM per projection) or megatron's per-expert loop."""
    if grouped_gemm:
        from loongforge_llm.moe.experts import GroupedExperts

        return GroupedExperts
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    return partial(SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear))


def moe_mlp_builder(grouped_gemm: bool, shared_experts=None):
    """The ``mlp`` submodule of an MoE transformer layer."""
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    return partial(MoELayer, submodules=MoESubmodules(experts=experts_builder(grouped_gemm),
                                                      shared_experts=shared_experts))


def _with_mlp(layer_spec: ModuleSpec, mlp) -> ModuleSpec:
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))


def moe_decoder_spec(dense_spec: ModuleSpec, config, moe_layers: tuple[bool, ...], moe_mlp,
                     vp_stage: int | None = None) -> ModuleSpec:
    """``dense_spec`` (a ``TransformerLayer`` or ``TransformerBlock`` spec, as a backend gives
    it) with ``moe_mlp`` in the layers of this pipeline chunk that ``moe_layers`` (one flag per
    global layer) marks. A layer spec stays a layer spec when every local layer is MoE; otherwise
    a block spec lists the chunk's layers."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    count = get_num_layers_to_build(config, vp_stage, pp_rank)
    local = moe_layers[offset:offset + count]
    is_block = isinstance(dense_spec.module, type) and issubclass(dense_spec.module, TransformerBlock)
    if not is_block and all(local):
        return _with_mlp(dense_spec, moe_mlp)
    if is_block:
        layers, norm = list(dense_spec.submodules.layer_specs), dense_spec.submodules.layer_norm
    else:
        layers, norm = [dense_spec] * count, LayerNormImpl
    specs = [_with_mlp(spec, moe_mlp) if moe else spec for spec, moe in zip(layers, local, strict=True)]
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm))


def routed_experts_mlp(config, moe):
    """``MoEFamilySpec.moe_mlp`` of families with routed experts only (Qwen3-MoE)."""
    return moe_mlp_builder(moe.options.grouped_gemm)
