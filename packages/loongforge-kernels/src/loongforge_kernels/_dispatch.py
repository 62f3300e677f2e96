"""Choosing between a Triton kernel and its torch reference, per call.

``LOONGFORGE_KERNELS_IMPL`` (read at each call) forces a path:

- ``auto`` (default): Triton when every tensor is on CUDA and triton is installed;
- ``triton``: always Triton (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before triton
  is first imported -- that is how the CPU tests run the kernels);
- ``reference``: always the pure-torch reference.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

ENV_IMPL = "LOONGFORGE_KERNELS_IMPL"
_MODES = ("auto", "triton", "reference")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")


def mode() -> str:
    value = os.environ.get(ENV_IMPL, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV_IMPL}={value!r}: expected one of {_MODES}")
    return value


def use_triton(*tensors) -> bool:
    """True when this call should take the Triton path for ``tensors``."""
    chosen = mode()
    if chosen == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if chosen == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(f"{ENV_IMPL}=triton but triton is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"{ENV_IMPL}=triton on non-CUDA tensors needs TRITON_INTERPRET=1 (set before triton is imported)"
        )
    return True


def num_programs(device, per_sm: int = 4, cpu: int = 2) -> int:
    """A grid size that fills the GPU for kernels that loop over rows (few on the interpreter)."""
    import torch

    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return cpu


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
