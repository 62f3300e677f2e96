"""Dao-AILab flash-attention as attention candidates, when installed (extra ``flash-attn``).

Three generations ship under different module names: FA4 ``flash_attn.cute`` (CuTe DSL kernels,
compiled on first use, Hopper and Blackwell), FA3 ``flash_attn_interface`` (the Hopper build) and
FA2 ``flash_attn.flash_attn_interface``. Each installed one is registered as a kernel
(``kernels.disable`` can name it) and joins the CUDA backend's per-shape timing
(:class:`loongforge_cuda.attention.MeasuredSDPAttention`), so it runs only where it measured fastest. All take [b, s, h, d] and grouped KV heads natively;
the candidates here take the [b, h, s, d] views our attention passes and return one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plugin discovery imports this module (``installed()``): it imports no torch
    import torch

#: candidate name -> module whose ``flash_attn_func(q, k, v, softmax_scale=, causal=)`` it calls
MODULES = {
    "flash_attn4": "flash_attn.cute",
    "flash_attn3": "flash_attn_interface",
    "flash_attn2": "flash_attn.flash_attn_interface",  # not plain flash_attn: FA4 makes that a namespace
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a bare namespace
        return False


def installed() -> list[str]:
    """The candidate names whose flash-attention module is importable (nothing is imported yet:
    FA4 pulls in the CuTe DSL compiler)."""
    return [name for name, module in MODULES.items() if _importable(module)]


@functools.cache
def _flash_attn_func(name: str):
    return importlib.import_module(MODULES[name]).flash_attn_func


def flash_attn_attention(name: str, q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Attention of [b, h, s, d] ``q, k, v`` through the installed flash-attention ``name``; a
    ``RuntimeError`` naming why when it does not take these inputs (the timing then skips it)."""
    import torch

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"{name}: takes fp16/bf16, got {q.dtype}")
    try:
        func = _flash_attn_func(name)
    except ImportError as exc:  # installed but broken (a missing dependency): skipped, with the reason
        raise RuntimeError(f"{name} does not import: {exc}") from exc
    try:
        out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
    except (AssertionError, ValueError, TypeError, NotImplementedError) as exc:  # the libraries' input checks
        raise RuntimeError(f"{name}: {exc}") from exc
    out = out[0] if isinstance(out, tuple) else out  # FA4 and some FA3 builds also return the LSE
    return out.transpose(1, 2)


def flash_attn4(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    return flash_attn_attention("flash_attn4", q, k, v, causal, scale)


def flash_attn3(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    return flash_attn_attention("flash_attn3", q, k, v, causal, scale)


def flash_attn2(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    return flash_attn_attention("flash_attn2", q, k, v, causal, scale)


def attention_reference(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """torch's math SDPA on the same [b, h, s, d] inputs (grouped KV heads repeated)."""
    import torch
    import torch.nn.functional as F

    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
