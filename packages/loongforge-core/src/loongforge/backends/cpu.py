"""The CPU reference backend: gloo collectives, and megatron-core's CUDA assumptions redirected.

megatron-core allocates with ``device=torch.cuda.current_device()`` and ``device="cuda"`` in many
places (parallel linear layers, DDP buffers, optimizer scalars, grad clipping) and keeps its
dropout RNG states through ``torch.cuda`` calls. Inside :meth:`CpuBackend.activate`:

1. ``_CpuDeviceMode`` (a ``TorchFunctionMode``) rewrites any CUDA ``device=`` argument of a torch
   call to CPU, turns ``Tensor.cuda()`` into a no-op and reports CPU tensors' ``type()`` with the
   ``torch.cuda.`` prefix that megatron-core's optimizers dispatch on;
2. ``torch.cuda.current_device``/``synchronize``/``manual_seed``/``current_stream``/``stream``
   are replaced by CPU equivalents;
3. megatron-core's RNG tracker is a :class:`CpuRNGStatesTracker` (one CPU generator per name), and
   its get/set of the "CUDA" RNG state (used around activation recompute) use the CPU generator.

All three are undone when the context exits. ``tests/test_cpu_backend.py`` fails when a
megatron-core upgrade needs another adaptation.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

from loongforge.backend import Backend


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuDeviceMode(TorchFunctionMode):
    """Route CUDA allocations and transfers requested by megatron-core to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core dispatches on type strings such as "torch.cuda.FloatTensor"
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to,) and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _HostStream:
    """Stands in for ``torch.cuda.Stream``: on the CPU all work is already ordered."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CpuRNGStatesTracker:
    """megatron-core's RNG-tracker interface (add/fork/get_states/set_states) on CPU generators.

    ``fork(name)`` swaps the global CPU RNG state for the named one, like the CUDA tracker does
    for the CUDA generator, so dropout inside model-parallel regions is reproducible.
    """

    def __init__(self, **_: Any):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._initialized = False

    def is_initialized(self) -> bool:
        return self._initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} or seed {seed} already exists")
        self._initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class CpuBackend(Backend):
    name = "cpu"
    collective_backend = "gloo"

    def is_available(self) -> bool:
        return True

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    @contextlib.contextmanager
    def activate(self, local_rank: int = 0):
        from megatron.core.tensor_parallel import random as mcore_random

        tracker = CpuRNGStatesTracker()
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
            stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
            stack.enter_context(mock.patch.object(torch.cuda, "manual_seed", lambda seed: None))
            stack.enter_context(mock.patch.object(torch.cuda, "current_stream", lambda *a, **k: _HostStream()))
            stack.enter_context(mock.patch.object(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext()))
            # activation recompute saves and restores the "CUDA" RNG state around each checkpoint
            stack.enter_context(mock.patch.object(mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()))
            stack.enter_context(mock.patch.object(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)))
            stack.enter_context(mock.patch.object(mcore_random, "_CUDA_RNG_STATE_TRACKER", tracker))
            stack.enter_context(mock.patch.object(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True))
            stack.enter_context(_CpuDeviceMode())
            yield self

    def manual_seed(self, seed: int) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import random as mcore_random

        torch.manual_seed(seed)
        tracker = mcore_random.get_cuda_rng_tracker()
        tracker.reset()
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        # the same offsets megatron-core uses, so TP ranks draw different dropout masks
        tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
        tracker.add("data-parallel-rng", seed)
        tracker.add("expert-parallel-rng", seed + 1024 + 100 * 0 + tp_rank)

    def rng_state(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel import random as mcore_random

        return {"cpu": torch.get_rng_state(), "tracker": mcore_random.get_cuda_rng_tracker().get_states()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        from megatron.core.tensor_parallel import random as mcore_random

        torch.set_rng_state(state["cpu"])
        mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])

    def memory_stats(self) -> dict[str, float]:
        import resource

        # ru_maxrss is KiB on Linux: the process's peak resident memory
        return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
