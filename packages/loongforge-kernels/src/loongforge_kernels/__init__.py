"""LoongForge fused Triton kernels, each with a pure-torch reference of the same signature.

Operators live in one small module each and are imported by path, never from here:

- :mod:`loongforge_kernels.rmsnorm` -- ``rms_norm(x, weight, eps)`` (HF Llama numerics) and
  ``add_rms_norm`` (residual add + norm)
- :mod:`loongforge_kernels.swiglu` -- ``swiglu(x)`` on megatron's fused ``[gate | up]`` fc1 output
- :mod:`loongforge_kernels.rope` -- ``apply_rope`` and ``qk_norm_rope`` on ``[S, B, H, D]``, and
  ``qkv_rope`` on megatron's fused QKV
- :mod:`loongforge_kernels.fused_linear_ce` -- chunked LM-head matmul + cross-entropy
- :mod:`loongforge_kernels.flash_attention` -- causal/full attention with grouped KV heads
- :mod:`loongforge_kernels.adamw` -- multi-tensor AdamW that also writes the low-precision params

This package and its :mod:`~loongforge_kernels.plugin` module import neither torch nor triton,
so that plugin discovery stays cheap; the operator modules import torch, and triton only when a
Triton path actually runs.
"""

from importlib.metadata import version as _version

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("loongforge-kernels")
