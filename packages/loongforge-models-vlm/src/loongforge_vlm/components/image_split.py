"""Encoder data parallelism inside the LLM's tensor-parallel group.

The LLM's TP ranks share a micro-batch, so a replicated (TP=1) encoder would encode every image on
every one of them. Instead each rank encodes a contiguous share of the batch's images (balanced
by patch count, :func:`shares`), and :class:`GatherShards` all-gathers the projected tokens so that
every rank scatters all of them into its (replicated) embeddings.

Gradients: after the LLM's backward the gradient of the gathered tokens is the same on every TP
rank (megatron-core all-reduces the input gradient of its column-parallel layers), so a rank takes
only the rows of its own images. The encoder's parameters then hold, on each rank, the gradient of
its own images only; megatron-core's ``finalize_model_grads`` averages parameters marked
``average_gradients_across_tp_domain`` over the TP group, so the rows are scaled by the group size
here to make that average the sum -- the gradient of all images, as in one process. The group is
handed over when the model is built; no global parallel state is read or switched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def pixel_rows(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[int]:
    """Rows of ``pixel_values`` per image: patches (Qwen-style [patches, dim] inputs) or tiles
    (fixed-size [tiles, C, H, W] inputs, ``grid_thw[:, 0]`` tiles per image)."""
    g = grid_thw.tolist()
    return [t * h * w for t, h, w in g] if pixel_values.dim() == 2 else [t for t, _, _ in g]


def shares(rows: list[int], n: int) -> list[tuple[int, int]]:
    """Contiguous image ranges [start, end) for ``n`` ranks, balancing the pixel rows."""
    total, bounds, at, acc = sum(rows), [0], 0, 0
    for r in range(1, n):
        while at < len(rows) and acc + rows[at] / 2 <= total * r / n:
            acc += rows[at]
            at += 1
        bounds.append(at)
    bounds.append(len(rows))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class GatherShards(torch.autograd.Function):
    """Forward: the ranks' ``local`` rows concatenated in rank order (sizes may differ).
    Backward: this rank's rows of the gradient, times the group size (see the module docstring)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        n = dist.get_world_size(group)
        size = torch.tensor([local.shape[0]], dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(n)]
        dist.all_gather(sizes, size, group=group)
        sizes = [int(s) for s in sizes]
        most = max(sizes)
        padded = local.new_zeros(most, *local.shape[1:])
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        rank = dist.get_rank(group)
        ctx.start, ctx.rows, ctx.scale = sum(sizes[:rank]), local.shape[0], float(n)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start:ctx.start + ctx.rows] * ctx.scale, None


def mark_tp_averaged(module: torch.nn.Module) -> None:
    """Have megatron-core's ``finalize_model_grads`` average these gradients over the TP group."""
    for p in module.parameters():
        p.average_gradients_across_tp_domain = True
