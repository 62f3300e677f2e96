"""Triton kernels and their launchers; imported only when a Triton path runs.

Under ``TRITON_INTERPRET=1`` the interpreter must have been on when ``triton`` itself was first
imported: ``triton.language``'s helpers (``tl.sum``...) are decorated then, and an interpreted
kernel cannot call a compiled helper (Triton only says "Cannot call @triton.jit'd outside of the
scope of a kernel"). Fail here with the cause instead.
"""

import triton.language as tl

from .._dispatch import interpreting

if interpreting() and type(tl.sum).__name__ != "InterpretedFunction":
    raise RuntimeError(
        "TRITON_INTERPRET=1 was set after triton had been imported (something imported triton "
        "first, e.g. megatron.core), so Triton's CPU interpreter cannot run loongforge_kernels. "
        "Set TRITON_INTERPRET=1 in the environment before Python starts (the repository's root "
        "conftest.py does this for pytest on machines without CUDA)."
    )
