"""Tensor parallelism of a vision encoder over an explicitly given process group.

``shard(encoder, plan, group)`` replaces the ``nn.Linear`` layers its ``TP_PLAN`` names by
column- or row-parallel versions holding this rank's slice of the (already initialised) weights,
and divides the head count of its attention modules. The group is handed over once, when the
provider builds the encoder; nothing reads or switches megatron-core's global parallel state.
Sharded parameters carry megatron-core's ``tensor_model_parallel`` / ``partition_dim`` marks, so
its gradient-norm reduction and checkpoint sharding (:class:`Shardable`) treat them like the
LLM's: this requires the group to be the LLM's tensor-parallel group (encoder TP = LLM TP).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the input's gradient is summed over the group (each rank's slice of the
    next column-parallel layer contributes a part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Sum of the partial products over the group; the gradient is passed through unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnLinear(nn.Module):
    """Output features split over the group: this rank computes its slice."""

    def __init__(self, full: nn.Linear, rank: int, size: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(full.weight.detach().chunk(size, 0)[rank].clone())
        self.bias = nn.Parameter(full.bias.detach().chunk(size, 0)[rank].clone()) if full.bias is not None else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1

    def forward(self, x):
        return F.linear(_CopyToGroup.apply(x, self.group), self.weight, self.bias)


class RowLinear(nn.Module):
    """Input features split over the group: partial products summed, then the (whole) bias."""

    def __init__(self, full: nn.Linear, rank: int, size: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(full.weight.detach().chunk(size, 1)[rank].clone())
        self.weight.tensor_model_parallel, self.weight.partition_dim, self.weight.partition_stride = True, 1, 1
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x):
        y = _ReduceFromGroup.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def shard(encoder: nn.Module, group, *, key: str = "model.image_encoder.parallel.tp") -> dict[str, int]:
    """Shard ``encoder`` by its ``TP_PLAN`` (``{name regex: "column" | "row"}``) over ``group``;
    returns {parameter name: split axis}. Attention modules (``heads`` attribute) keep heads/size."""
    plan = getattr(type(encoder), "TP_PLAN", None)
    if not plan:
        raise ValueError(f"config key '{key}': encoder {type(encoder).__name__} has no tensor-parallel plan (TP_PLAN)")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    axes: dict[str, int] = {}
    for name, module in list(encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            kind = next((k for pattern, k in plan.items() if re.fullmatch(pattern, full_name)), None)
            if kind is None:
                continue
            dim = 0 if kind == "column" else 1
            if not isinstance(child, nn.Linear) or child.weight.shape[dim] % size:
                raise ValueError(f"config key '{key}': {full_name} ({tuple(child.weight.shape)}) cannot be split "
                                 f"{size} ways")
            setattr(module, child_name, (ColumnLinear if kind == "column" else RowLinear)(child, rank, size, group))
            axes[f"{full_name}.weight"] = dim
            if kind == "column" and child.bias is not None:
                axes[f"{full_name}.bias"] = 0
        if hasattr(module, "heads"):
            if module.heads % size:
                raise ValueError(f"config key '{key}': {module.heads} attention heads cannot be split {size} ways")
            module.heads //= size
    encoder.tp_group, encoder.tp_axes = group, axes
    return axes


class Shardable:
    """Mixin of encoders: megatron-core's checkpoint entries, split along ``tp_axes`` when sharded."""

    tp_group = None
    tp_axes: dict[str, int] = {}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        group = self.tp_group or parallel_state.get_tensor_model_parallel_group()  # replicas: TP rank 0 saves
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, dict(self.tp_axes),
                                                   sharded_offsets, tp_group=group, dp_cp_group=metadata["dp_cp_group"])
