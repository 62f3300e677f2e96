"""Repository-wide pytest setup, loaded before any package's tests are collected.

Triton's CPU interpreter must be chosen before ``triton`` is first imported: ``triton.language``'s
own helpers (``tl.sum``, ``tl.max``...) are decorated at import time, and an interpreted kernel
cannot call helpers compiled for the GPU. megatron-core imports triton, so the first test module
that imports megatron would otherwise fix that choice before loongforge-kernels' tests ask for the
interpreter. Without a GPU, Triton kernels can only run interpreted, so switch it on here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
