"""Which registered fused kernels a run uses: one per operator, minus ``kernels.disable``.

``kernels.disable`` entries name a kernel (``triton_rmsnorm``) or an operator (``rmsnorm``); an
entry that matches nothing registered is an error (a typo would otherwise silently keep the
kernel on).
"""

from __future__ import annotations

from collections.abc import Iterable

from loongforge.config import ConfigError
from loongforge.registry import Kernel, load_object


def select_kernels(kernels: Iterable[Kernel], disable: Iterable[str] = (), device_type: str = "cuda") -> dict[str, Kernel]:
    """``{op: Kernel}``: the first registered kernel per operator that runs on ``device_type`` and
    is not disabled by name or operator."""
    kernels = list(kernels)
    disable = [str(d) for d in disable]
    known = {k.name for k in kernels} | {k.op for k in kernels}
    unknown = [d for d in disable if d not in known]
    if unknown:
        raise ConfigError(
            f"config key 'kernels.disable': {', '.join(map(repr, unknown))} names no registered kernel or "
            f"operator (registered: {', '.join(sorted(known)) or 'none'})"
        )
    chosen: dict[str, Kernel] = {}
    for k in kernels:
        if k.name in disable or k.op in disable or device_type not in k.device_types:
            continue
        chosen.setdefault(k.op, k)
    return chosen


def resolve(chosen: dict[str, Kernel], op: str):
    """The callable for ``op``, or ``None`` when no kernel is active for it."""
    k = chosen.get(op)
    return None if k is None else load_object(k.impl)
