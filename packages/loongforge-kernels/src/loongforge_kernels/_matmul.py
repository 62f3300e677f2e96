"""An fp32 accumulator for bf16/fp16 matmuls (the chunked LM-head loss's weight gradient).

On CUDA this uses ``torch.addmm(..., out_dtype=torch.float32, out=acc)`` (cuBLAS with fp32 output,
in place). Whether the installed torch supports those layouts
is probed once per device; without them (and on CPU, where the interpreter tests run) the operands
are upcast to fp32, which is exact but costs memory.
"""

from __future__ import annotations

import torch

_PROBED: dict[tuple[str, int | None], bool] = {}


def _fp32_out_supported(device: torch.device) -> bool:
    key = (device.type, device.index)
    if key not in _PROBED:
        ok = False
        try:
            # Small integers: every product and sum is exact, so results must match bit for bit.
            a = torch.randint(-3, 4, (16, 8), device=device).to(torch.bfloat16)
            b = torch.randint(-3, 4, (12, 8), device=device).to(torch.bfloat16)
            expect = a.float() @ b.float().t()
            got = torch.mm(a, b.t(), out_dtype=torch.float32)
            acc = torch.ones(8, 12, dtype=torch.float32, device=device)
            torch.addmm(acc, a.t(), got.to(torch.bfloat16), out_dtype=torch.float32, out=acc)
            acc_expect = 1.0 + a.float().t() @ got
            ok = got.dtype == torch.float32 and torch.equal(got, expect) and torch.equal(acc, acc_expect)
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _PROBED[key] = ok
    return _PROBED[key]


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, ``acc`` fp32."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda and _fp32_out_supported(a.device):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())
