"""FP8 quantisation for scaled GEMMs: per-tensor, per-row and per-group scales, with transposition.

Every function returns ``(q, scale_inv)``: ``q`` the fp8 tensor, ``scale_inv`` the fp32 *dequantisation*
scales (``x ~ q * scale_inv``), the form ``torch.nn.functional.scaled_mm`` takes. Quantisation of a
group (its absolute maximum ``amax``): ``scale = fmax / max(amax, 1e-12)`` (fp32, correctly rounded),
``q = fp8(clamp(x * scale, -fmax, fmax))`` rounded to nearest even, ``scale_inv = 1 / scale``.

- :func:`quantize_rows` ``(x [M, K], group)``: groups of ``group`` consecutive elements along K
  (``group = K``: one scale per row, the *rowwise* recipe; 128: DeepSeek's 1x128 tiles). Scales
  ``[M, K // group]``. ``scale`` given (a 1-element tensor): that quantisation scale for every element
  (the *tensorwise* recipe) and ``scale_inv`` its inverse.
- :func:`quantize_cols` ``(x [M, K], group)``: the same along M, written transposed: ``q`` is ``[K, M]``
  (row-major) with scales ``[K, M // group]`` -- exactly ``quantize_rows(x.t())`` in one pass, what the
  weight-gradient and data-gradient GEMMs read.
- :func:`quantize_blocks` ``(w [N, K], block)``: ``block x block`` tiles (DeepSeek's 128x128 weight
  blocks), scales ``[N // block, K // block]``; optionally also ``q.t()`` contiguous (a tile's scale is
  the same either way).

Triton kernels (``_triton/fp8.py``) on CUDA, the torch references here otherwise (see ``_dispatch``).
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
AMAX_EPS = 1e-12


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(fp8_max(dtype), dtype=torch.float32, device=amax.device) / amax.float().clamp_min(AMAX_EPS)


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = fp8_max(dtype)
    return (x.float() * scale).clamp_(-fmax, fmax).to(dtype)


def tensor_scale(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """The tensorwise quantisation scale of ``x`` (1 element, fp32, on x's device)."""
    return _scale_from_amax(x.abs().amax().reshape(1), dtype)


def quantize_rows_reference(x: torch.Tensor, group: int, dtype: torch.dtype = E4M3,
                            scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    x = x.contiguous()
    if scale is not None:
        return _cast(x, scale.float().reshape(()), dtype), (1.0 / scale.float()).reshape(())
    g = x.float().reshape(m, k // group, group)
    s = _scale_from_amax(g.abs().amax(dim=-1, keepdim=True), dtype)
    q = _cast(g, s, dtype).reshape(m, k)
    return q, (1.0 / s).reshape(m, k // group)


def quantize_cols_reference(x: torch.Tensor, group: int, dtype: torch.dtype = E4M3,
                            scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows_reference(x.t().contiguous(), group, dtype, scale)


def quantize_blocks_reference(w: torch.Tensor, block: int = 128, dtype: torch.dtype = E4M3,
                              transpose: bool = False):
    n, k = w.shape
    t = w.float().reshape(n // block, block, k // block, block)
    s = _scale_from_amax(t.abs().amax(dim=(1, 3), keepdim=True), dtype)
    q = _cast(t, s, dtype).reshape(n, k)
    s_inv = (1.0 / s).reshape(n // block, k // block)
    return (q, s_inv, q.t().contiguous()) if transpose else (q, s_inv)


def _check(x: torch.Tensor, group_dim: int, group: int, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if group <= 0 or x.shape[group_dim] % group:
        raise ValueError(f"{what}: dim {group_dim} of {tuple(x.shape)} is not a multiple of the group {group}")


def quantize_rows(x: torch.Tensor, group: int, dtype: torch.dtype = E4M3, scale: torch.Tensor | None = None):
    """``(q [M, K], scale_inv [M, K // group] or a 0-d tensor)``; see the module docstring."""
    _check(x, 1, group, "quantize_rows")
    if not use_triton(x):
        return quantize_rows_reference(x, group, dtype, scale)
    from ._triton import fp8 as kernels

    return kernels.quantize_rows(x.contiguous(), group, dtype, scale)


def quantize_cols(x: torch.Tensor, group: int, dtype: torch.dtype = E4M3, scale: torch.Tensor | None = None):
    """``(q [K, M], scale_inv [K, M // group] or a 0-d tensor)``: ``quantize_rows(x.t())`` in one pass."""
    _check(x, 0, group, "quantize_cols")
    if not use_triton(x):
        return quantize_cols_reference(x, group, dtype, scale)
    from ._triton import fp8 as kernels

    return kernels.quantize_cols(x.contiguous(), group, dtype, scale)


def quantize_blocks(w: torch.Tensor, block: int = 128, dtype: torch.dtype = E4M3, transpose: bool = False):
    """``(q [N, K], scale_inv [N // block, K // block])`` and, with ``transpose``, also ``q.t()`` contiguous."""
    _check(w, 0, block, "quantize_blocks")
    _check(w, 1, block, "quantize_blocks")
    if not use_triton(w):
        return quantize_blocks_reference(w, block, dtype, transpose)
    from ._triton import fp8 as kernels

    return kernels.quantize_blocks(w.contiguous(), block, dtype, transpose)
