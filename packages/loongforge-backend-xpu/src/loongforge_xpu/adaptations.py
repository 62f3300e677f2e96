"""Every megatron-core adaptation the Kunlun XPU backend makes, in one place, applied only inside
:meth:`loongforge_xpu.backend.XpuBackend.activate` and undone when it exits.

Kunlun's PyTorch build presents the device through the public ``torch.cuda`` API (``torch_xmlir``
registers it; device type ``cuda``). megatron-core's RNG tracker reaches past that API:
``megatron.core.tensor_parallel.random._set_cuda_rng_state`` calls ``torch._C`` and
``torch.cuda.default_generators[idx].set_state`` through ``torch.cuda._lazy_call``, and the
graph-safe path of ``_get_cuda_rng_state`` uses ``default_generators`` too. These are CUDA
internals, not the API the vendor emulates, so both are routed to the public
``torch.cuda.get_rng_state``/``set_rng_state`` (used for the tracker's named streams, dropout
forks and activation recompute). megatron-core's CUDA-graph-safe RNG (``use_cudagraphable_rng``)
is not supported on this backend.

``tests/test_xpu_backend.py`` fails when megatron-core renames either function.
"""

from __future__ import annotations

import contextlib
from unittest import mock


def _get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    import torch

    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states are not supported on Kunlun XPU")
    state = torch.cuda.get_rng_state()
    return state.clone() if clone else state


def _set_rng_state(new_state, device: int = -1, graph_safe: bool = False) -> None:
    import torch

    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states are not supported on Kunlun XPU")
    torch.cuda.set_rng_state(new_state)


#: (module, attribute) -> replacement
ADAPTATIONS = {
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"): _get_rng_state,
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"): _set_rng_state,
}


@contextlib.contextmanager
def applied():
    """Apply :data:`ADAPTATIONS` for the length of the context."""
    import importlib

    with contextlib.ExitStack() as stack:
        for (module, attribute), replacement in ADAPTATIONS.items():
            target = importlib.import_module(module)
            if not hasattr(target, attribute):
                raise RuntimeError(f"megatron-core has no {module}.{attribute} any more: "
                                   "loongforge_xpu.adaptations needs updating")
            stack.enter_context(mock.patch.object(target, attribute, replacement))
        yield
