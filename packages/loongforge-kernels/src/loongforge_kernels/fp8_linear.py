"""FP8 GEMMs through torch's scaled matmul, the three scaling recipes, and an FP8 linear layer.

A GEMM operand is an :class:`Operand`: ``q`` fp8 ``[R, K]`` row-major (K the contracted dim), its
dequantisation scales ``s`` and their ``kind``: ``tensor`` (one scale), ``row`` (one per row),
``1x128`` (per row and 128 consecutive K elements) or ``128x128`` (per 128x128 block).
:func:`scaled_gemm` computes ``a @ b.T`` with ``torch.nn.functional.scaled_mm`` (``impl="scaled_mm"``,
CUDA compute capability >= 8.9; torch's CPU kernels cover ``tensor`` and ``row``) or by
dequantising (``impl="emulated"``: the numerics reference, any device).

Recipes (:data:`RECIPES`), for ``y = x W^T`` with x ``[M, K]``, W ``[N, K]``:

============  ============================  ==============================  ==============================
recipe        forward (x, W)                data gradient (dy, W^T)         weight gradient (dy^T, x^T)
============  ============================  ==============================  ==============================
tensorwise    tensor e4m3, tensor e4m3      tensor e5m2, tensor e4m3        tensor e5m2, tensor e4m3
rowwise       row, row (e4m3)               row over N, row over N          row over M, row over M
blockwise     1x128, 128x128 (e4m3)         1x128 over N, 128x128           1x128 over M, 1x128 over M
============  ============================  ==============================  ==============================

(DeepSeek-V3's recipe is the blockwise one: 1x128 activation and gradient tiles, 128x128 weight blocks.)
Layouts that torch's scaled matmul wants (from pytorch's ``test_scaled_matmul_cuda.py``): ``b`` passed
as ``q.t()`` (column-major), rowwise ``b`` scales ``[1, N]``, 1x128 scales outer-dim-major
(``s.t().contiguous().t()``), 128x128 scales padded to a multiple of 4 K-blocks and passed as ``s.t()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import E4M3, E5M2, quantize_blocks, quantize_cols, quantize_rows, tensor_scale

BLOCK = 128
RECIPES = ("tensorwise", "rowwise", "blockwise")


@dataclass
class Operand:
    q: torch.Tensor
    s: torch.Tensor
    kind: str  # tensor | row | 1x128 | 128x128


def dequantize(op: Operand) -> torch.Tensor:
    """fp32 ``q * s`` with each scale spread over its group."""
    q = op.q.float()
    if op.kind == "tensor":
        return q * op.s.float().reshape(())
    if op.kind == "row":
        return q * op.s.float().reshape(-1, 1)
    if op.kind == "1x128":
        return q * op.s.float().repeat_interleave(BLOCK, dim=1)
    if op.kind == "128x128":
        return q * op.s.float().repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
    raise ValueError(f"unknown operand scale kind {op.kind!r}")


def _scaled_mm_scale(op: Operand, side: str):
    from torch.nn.functional import ScalingType

    s = op.s.float()
    if op.kind == "tensor":
        return s.reshape(()), ScalingType.TensorWise
    if op.kind == "row":
        return (s.reshape(-1, 1) if side == "a" else s.reshape(1, -1)).contiguous(), ScalingType.RowWise
    if op.kind == "1x128":
        return s.t().contiguous().t(), ScalingType.BlockWise1x128
    if op.kind == "128x128":
        k_blocks = s.shape[1]
        padded = -(-k_blocks // 4) * 4
        if padded != k_blocks:
            s = torch.nn.functional.pad(s, (0, padded - k_blocks), value=1.0)
        return s.contiguous().t(), ScalingType.BlockWise128x128
    raise ValueError(f"unknown operand scale kind {op.kind!r}")


def scaled_mm_args(a: Operand, b: Operand) -> dict:
    """The keyword arguments of ``torch.nn.functional.scaled_mm`` for ``a @ b.T`` (see the module docstring)."""
    from torch.nn.functional import SwizzleType

    scale_a, recipe_a = _scaled_mm_scale(a, "a")
    scale_b, recipe_b = _scaled_mm_scale(b, "b")
    return dict(mat_a=a.q, mat_b=b.q.t(), scale_a=scale_a, scale_recipe_a=recipe_a, scale_b=scale_b,
                scale_recipe_b=recipe_b, swizzle_a=SwizzleType.NO_SWIZZLE, swizzle_b=SwizzleType.NO_SWIZZLE)


def scaled_gemm(a: Operand, b: Operand, out_dtype: torch.dtype = torch.bfloat16, impl: str = "scaled_mm"):
    """``a @ b.T`` -> ``[Ra, Rb]`` in ``out_dtype``."""
    if impl == "emulated":
        return (dequantize(a) @ dequantize(b).t()).to(out_dtype)
    if impl != "scaled_mm":
        raise ValueError(f"scaled_gemm: impl must be scaled_mm or emulated, got {impl!r}")
    if out_dtype == torch.float32 and a.kind == "row" and a.q.is_cuda:
        # torch's CUDA rowwise kernels write bf16 only
        return torch.nn.functional.scaled_mm(**scaled_mm_args(a, b), output_dtype=torch.bfloat16).float()
    return torch.nn.functional.scaled_mm(**scaled_mm_args(a, b), output_dtype=out_dtype)


# --- recipes: which operand each GEMM reads ----------------------------------------------------------


def forward_operands(recipe: str, x: torch.Tensor, w: torch.Tensor):
    """``(x operand, W operand, state kept for backward)`` for ``y = x W^T`` (x ``[M, K]``, W ``[N, K]``)."""
    if recipe == "tensorwise":
        xs, ws = tensor_scale(x, E4M3), tensor_scale(w, E4M3)
        xq, xsi = quantize_rows(x, x.shape[1], E4M3, scale=xs)
        wq, wsi = quantize_rows(w, w.shape[1], E4M3, scale=ws)
        return Operand(xq, xsi, "tensor"), Operand(wq, wsi, "tensor"), (xs, ws)
    if recipe == "rowwise":
        xq, xsi = quantize_rows(x, x.shape[1], E4M3)
        wq, wsi = quantize_rows(w, w.shape[1], E4M3)
        return Operand(xq, xsi, "row"), Operand(wq, wsi, "row"), ()
    if recipe == "blockwise":
        xq, xsi = quantize_rows(x, BLOCK, E4M3)
        wq, wsi, wqt = quantize_blocks(w, BLOCK, E4M3, transpose=True)
        # the transposed blocks serve the data gradient: a block's scale does not change with it
        return Operand(xq, xsi, "1x128"), Operand(wq, wsi, "128x128"), (wqt, wsi)
    raise ValueError(f"unknown FP8 recipe {recipe!r}; expected one of {RECIPES}")


def backward_operands(recipe: str, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, state):
    """``((dy, W^T) operands of dx = dy W, (dy^T, x^T) operands of dW = dy^T x)``."""
    m, n = dy.shape
    if recipe == "tensorwise":
        xs, ws = state
        gs = tensor_scale(dy, E5M2)
        gq, gsi = quantize_rows(dy, n, E5M2, scale=gs)
        wtq, wtsi = quantize_cols(w, n, E4M3, scale=ws)
        gtq, gtsi = quantize_cols(dy, m, E5M2, scale=gs)
        xtq, xtsi = quantize_cols(x, m, E4M3, scale=xs)
        return ((Operand(gq, gsi, "tensor"), Operand(wtq, wtsi, "tensor")),
                (Operand(gtq, gtsi, "tensor"), Operand(xtq, xtsi, "tensor")))
    if recipe == "rowwise":
        gq, gsi = quantize_rows(dy, n, E4M3)
        wtq, wtsi = quantize_cols(w, n, E4M3)
        gtq, gtsi = quantize_cols(dy, m, E4M3)
        xtq, xtsi = quantize_cols(x, m, E4M3)
        return ((Operand(gq, gsi, "row"), Operand(wtq, wtsi, "row")),
                (Operand(gtq, gtsi, "row"), Operand(xtq, xtsi, "row")))
    if recipe == "blockwise":
        wqt, wsi = state
        gq, gsi = quantize_rows(dy, BLOCK, E4M3)
        gtq, gtsi = quantize_cols(dy, BLOCK, E4M3)
        xtq, xtsi = quantize_cols(x, BLOCK, E4M3)
        return ((Operand(gq, gsi, "1x128"), Operand(wqt, wsi.t().contiguous(), "128x128")),
                (Operand(gtq, gtsi, "1x128"), Operand(xtq, xtsi, "1x128")))
    raise ValueError(f"unknown FP8 recipe {recipe!r}; expected one of {RECIPES}")


def supports(recipe: str, m: int, n: int, k: int) -> bool:
    """Whether ``recipe`` covers ``y [m, n] = x [m, k] W[n, k]^T`` with its backward: torch's scaled
    matmul needs multiples of 16; blockwise needs whole 128 tiles along every contracted dim."""
    if recipe == "blockwise":
        return m % BLOCK == 0 and n % BLOCK == 0 and k % BLOCK == 0
    return m % 16 == 0 and n % 16 == 0 and k % 16 == 0


class FP8LinearFunction(torch.autograd.Function):
    """``y = x W^T`` with forward, data- and weight-gradient GEMMs in FP8 (``recipe``). x ``[..., K]``
    (bf16), W ``[N, K]``. ``accumulate_wgrad``: the weight gradient goes into ``weight.main_grad``
    (megatron-core's gradient-accumulation fusion semantics) instead of being returned."""

    @staticmethod
    def forward(ctx, x, weight, recipe: str, impl: str, accumulate_wgrad: bool):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        xa, wb, state = forward_operands(recipe, x2, weight)
        y = scaled_gemm(xa, wb, x.dtype, impl)
        ctx.save_for_backward(x2, weight)
        ctx.state, ctx.recipe, ctx.impl, ctx.accumulate, ctx.lead = state, recipe, impl, accumulate_wgrad, lead
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0]).contiguous()
        (ga, wtb), (gta, xtb) = backward_operands(ctx.recipe, dy2, x2, weight, ctx.state)
        dx = scaled_gemm(ga, wtb, dy.dtype, ctx.impl).reshape(*ctx.lead, weight.shape[1])
        if ctx.accumulate:
            weight.main_grad.add_(scaled_gemm(gta, xtb, weight.main_grad.dtype, ctx.impl))
            grad_weight = None
            if hasattr(weight, "grad_added_to_main_grad"):  # megatron's DDP: a dummy grad, hooks skip it
                grad_weight = torch.empty(weight.shape, dtype=dy.dtype, device=dy.device)
                weight.grad_added_to_main_grad = True
        else:
            grad_weight = scaled_gemm(gta, xtb, weight.dtype, ctx.impl)
        return dx, grad_weight, None, None, None


def fp8_linear(x, weight, recipe: str, impl: str = "scaled_mm", accumulate_wgrad: bool = False):
    """:class:`FP8LinearFunction` applied: ``x @ weight.T`` with FP8 GEMMs both ways."""
    return FP8LinearFunction.apply(x, weight, recipe, impl, accumulate_wgrad)
