"""Rotary position embedding (rotate-half, HF Llama convention) on megatron's ``[S, B, H, D]``.

``cos``/``sin`` are ``[S, 1, 1, R]``, ``[S, B, 1, R]`` (angles per sample, e.g. position ids that
restart at each packed document) or ``[S, R]`` (``S`` may be 1 to broadcast) with ``R <= D`` even; lanes ``R..D`` pass through unchanged (megatron's partial rotary). RoPE is computed in fp32
from ``cos``/``sin`` in the precision they are given and rounded once to the output dtype.
``cos``/``sin`` are constants for the fused path: if either requires grad, the reference runs.

``qk_norm_rope`` applies Qwen3's per-head RMSNorm over ``D`` first (HF ``Qwen3RMSNorm``
numerics), fused with RoPE in a single kernel.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton
from .rmsnorm import rms_norm_reference

#: Largest head dim the fused kernels hold in registers.
MAX_FUSED_HEAD_DIM = 1024


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None, :] if t.dim() == 2 else t


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure-torch rotate-half RoPE: ``x * cos + rotate_half(x) * sin`` on the first ``R`` lanes."""
    r = cos.shape[-1]
    cos, sin = _as_4d(cos).to(torch.float32), _as_4d(sin).to(torch.float32)
    x_rot = x[..., :r].to(torch.float32)
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    if r == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat((out.to(x.dtype), x[..., r:]), dim=-1)


def qk_norm_rope_reference(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Pure-torch per-head RMSNorm over ``D`` followed by :func:`apply_rope_reference`."""
    return apply_rope_reference(rms_norm_reference(x, norm_weight, eps), cos, sin)


def _cos_sin_3d(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``[S|1, B|1, 1, R]`` or ``[S|1, R]`` -> ``[S, B, R]`` view (broadcast dims at stride 0) with
    unit stride on R."""
    s, b, _, d = x.shape
    if t.dim() == 4 and t.shape[2] == 1 and t.shape[1] in (1, b):
        t = t[:, :, 0, :]
    elif t.dim() == 2:
        t = t[:, None, :]
    else:
        raise ValueError(f"{name} must be [S, 1, 1, R], [S, B, 1, R] or [S, R], got {tuple(t.shape)} "
                         f"for x {tuple(x.shape)}")
    if t.shape[0] not in (1, s) or t.shape[-1] % 2 or t.shape[-1] > d:
        raise ValueError(f"{name} {tuple(t.shape)} does not fit x with S={s}, D={d} (R must be even, <= D)")
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.expand(s, b, t.shape[-1])


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _RopeFunction(torch.autograd.Function):
    """RoPE, with the per-head RMSNorm in front when ``weight`` is given."""

    @staticmethod
    def forward(ctx, x, weight, eps, cos3d, sin3d):
        from ._triton import rope as kernels

        x = _unit_last(x)
        weight = weight.contiguous() if weight is not None else None
        y, rstd = kernels.forward(x, cos3d, sin3d, weight, float(eps))
        if weight is None:
            ctx.save_for_backward(cos3d, sin3d)
        else:
            ctx.save_for_backward(cos3d, sin3d, x, weight, rstd)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from ._triton import rope as kernels

        dy = _unit_last(dy)
        if len(ctx.saved_tensors) == 2:
            cos3d, sin3d = ctx.saved_tensors
            dx, _ = kernels.backward(dy, cos3d, sin3d, ctx.x_dtype)
            return dx, None, None, None, None
        cos3d, sin3d, x, weight, rstd = ctx.saved_tensors
        dx, dw = kernels.backward(dy, cos3d, sin3d, x.dtype, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None, None, None


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [S, B, H, D], got {tuple(x.shape)}")


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The fused path, unconditionally (fwd and bwd in Triton)."""
    _check(x)
    return _RopeFunction.apply(x, None, 0.0, _cos_sin_3d(cos, x, "cos"), _cos_sin_3d(sin, x, "sin"))


def qk_norm_rope_triton(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The fused path, unconditionally (fwd and bwd in Triton)."""
    _check(x)
    d = x.shape[-1]
    if norm_weight.shape != (d,):
        raise ValueError(f"norm_weight must be [D={d}], got {tuple(norm_weight.shape)}")
    return _RopeFunction.apply(
        x, norm_weight, eps, _cos_sin_3d(cos, x, "cos"), _cos_sin_3d(sin, x, "sin")
    )


def _fusable(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *more: torch.Tensor) -> bool:
    return (
        x.dim() == 4
        and x.numel() > 0
        and x.shape[-1] <= MAX_FUSED_HEAD_DIM
        and not (cos.requires_grad or sin.requires_grad)
        and use_triton(x, cos, sin, *more)
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; Triton on CUDA, else :func:`apply_rope_reference`."""
    if not _fusable(x, cos, sin):
        return apply_rope_reference(x, cos, sin)
    return apply_rope_triton(x, cos, sin)


def qk_norm_rope(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Per-head RMSNorm over ``D`` then RoPE, in one kernel; else :func:`qk_norm_rope_reference`."""
    if not _fusable(x, cos, sin, norm_weight):
        return qk_norm_rope_reference(x, norm_weight, eps, cos, sin)
    return qk_norm_rope_triton(x, norm_weight, eps, cos, sin)
