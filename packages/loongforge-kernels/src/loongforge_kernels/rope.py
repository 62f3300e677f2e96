"""Rotary position embedding (rotate-half, HF Llama convention) on megatron's ``[S, B, H, D]``.

``cos``/``sin`` are ``[S, 1, 1, R]``, ``[S, B, 1, R]`` (angles per sample, e.g. position ids that
restart at each packed document) or ``[S, R]`` (``S`` may be 1 to broadcast) with ``R <= D`` even; lanes ``R..D`` pass through unchanged (megatron's partial rotary). RoPE is computed in fp32
from ``cos``/``sin`` in the precision they are given and rounded once to the output dtype.
``cos``/``sin`` are constants for the fused path: if either requires grad, the reference runs.

``qk_norm_rope`` applies Qwen3's per-head RMSNorm over ``D`` first (HF ``Qwen3RMSNorm``
numerics), fused with RoPE in a single kernel.

``qkv_rope`` starts from megatron's fused QKV projection output ``[S, B, G, (H/G + 2) * D]`` (per
KV group: its query heads, then k, then v): it rotates q and k (after their norms, if given) reading
them in place, returns v as a view, and in backward writes the three gradients straight into one
tensor of that layout. Megatron's own split instead copies the query heads into a contiguous tensor
(a reshape across groups) and concatenates the three gradients in backward: two full passes over q.
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


def _split_qkv(mixed: torch.Tensor, q_per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of megatron's fused QKV ``[S, B, G, (q_per_group + 2) * D]``: q grouped
    ``[S, B, G, q_per_group, D]``, k and v ``[S, B, G, D]``."""
    s, b, g, width = mixed.shape
    if width % (q_per_group + 2):
        raise ValueError(f"fused QKV last dim {width} is not (q_per_group={q_per_group} + 2) x head dim")
    d = width // (q_per_group + 2)
    grouped = mixed.view(s, b, g, q_per_group + 2, d)
    return grouped[:, :, :, :q_per_group], grouped[:, :, :, q_per_group], grouped[:, :, :, q_per_group + 1]


def qkv_rope_reference(
    mixed: torch.Tensor,
    q_per_group: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's split of the fused QKV (q reshaped to ``[S, B, H, D]``), then RoPE of q and k
    (per-head RMSNorm first when its weight is given)."""
    q, k, v = _split_qkv(mixed, q_per_group)
    q = q.reshape(*q.shape[:2], -1, q.shape[-1])

    def rotate(t, w):
        return apply_rope_reference(t, cos, sin) if w is None else qk_norm_rope_reference(t, w, eps, cos, sin)

    return rotate(q, q_norm_weight), rotate(k, k_norm_weight), v


class _QKVRopeFunction(torch.autograd.Function):
    """q and k rotated (normalised first when weights are given) and v, from the fused QKV; the
    backward builds the fused-QKV gradient directly."""

    @staticmethod
    def forward(ctx, mixed, q_weight, k_weight, eps, cos3d, sin3d, q_per_group):
        from ._triton import rope as kernels

        q_in, k_in, v = _split_qkv(mixed, q_per_group)
        q, q_rstd = kernels.forward(q_in, cos3d, sin3d, q_weight, float(eps))
        k, k_rstd = kernels.forward(k_in, cos3d, sin3d, k_weight, float(eps))
        ctx.q_per_group = q_per_group
        saved = [cos3d, sin3d]
        if q_weight is not None:  # (both or neither) the norms' backward reads the un-normalised input
            saved += [mixed, q_weight, q_rstd, k_weight, k_rstd]
        ctx.save_for_backward(*saved)
        ctx.mixed_shape, ctx.mixed_dtype = mixed.shape, mixed.dtype
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        from ._triton import rope as kernels

        cos3d, sin3d, *normed = ctx.saved_tensors
        dmixed = torch.empty(ctx.mixed_shape, dtype=ctx.mixed_dtype, device=cos3d.device)
        dq_out, dk_out, dv_out = _split_qkv(dmixed, ctx.q_per_group)
        grads = [None, None]
        mixed, q_weight, q_rstd, k_weight, k_rstd = normed or [None] * 5
        x_q, x_k = _split_qkv(mixed, ctx.q_per_group)[:2] if normed else (None, None)
        for i, (g, out, x, w, rstd) in enumerate(((dq, dq_out, x_q, q_weight, q_rstd),
                                                  (dk, dk_out, x_k, k_weight, k_rstd))):
            if g is None:
                out.zero_()
                continue
            _, dw = kernels.backward(_unit_last(g), cos3d, sin3d, ctx.mixed_dtype, x, w, rstd, out=out)
            grads[i] = dw if ctx.needs_input_grad[1 + i] else None
        if dv is None:
            dv_out.zero_()
        else:
            dv_out.copy_(dv)
        return dmixed, grads[0], grads[1], None, None, None, None


def qkv_rope_triton(mixed, q_per_group, cos, sin, q_norm_weight=None, k_norm_weight=None, eps=0.0):
    """The fused path, unconditionally (fwd and bwd in Triton)."""
    if mixed.dim() != 4 or mixed.stride(-1) != 1:
        raise ValueError(f"fused QKV must be [S, B, G, width] with unit stride on width, got {tuple(mixed.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("give both q and k norm weights or neither")
    k_in = _split_qkv(mixed, q_per_group)[1]
    return _QKVRopeFunction.apply(
        mixed, q_norm_weight, k_norm_weight, eps, _cos_sin_3d(cos, k_in, "cos"), _cos_sin_3d(sin, k_in, "sin"),
        q_per_group,
    )


def qkv_rope(
    mixed: torch.Tensor,
    q_per_group: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [S, B, H, D], k [S, B, G, D], v [S, B, G, D])`` from megatron's fused QKV with RoPE on
    q and k (QK-norm first when weights are given); Triton on CUDA, else :func:`qkv_rope_reference`."""
    weights = [w for w in (q_norm_weight, k_norm_weight) if w is not None]
    if not _fusable(_split_qkv(mixed, q_per_group)[1], cos, sin, *weights) or mixed.stride(-1) != 1:
        return qkv_rope_reference(mixed, q_per_group, cos, sin, q_norm_weight, k_norm_weight, eps)
    return qkv_rope_triton(mixed, q_per_group, cos, sin, q_norm_weight, k_norm_weight, eps)
