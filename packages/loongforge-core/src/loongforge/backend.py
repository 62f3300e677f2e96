"""The hardware-backend interface: what the trainer asks of a device.

A backend owns every adaptation megatron-core needs on its device, applied by :meth:`activate`
at a known moment and undone when the context exits.
"""

from __future__ import annotations

import contextlib
from typing import Any


class Backend:
    """Base class; ``loongforge.backends.cpu.CpuBackend`` is the reference implementation."""

    name: str = "base"
    #: set from the registry record; the default selection picks the highest available
    priority: int = 0
    #: ``torch.distributed`` backend for collectives (``"gloo"``, ``"nccl"``, ...)
    collective_backend: str = "gloo"
    #: whether megatron-core's distributed optimizer works here
    supports_distributed_optimizer: bool = True

    def is_available(self) -> bool:
        raise NotImplementedError

    def device(self, local_rank: int = 0):
        """The ``torch.device`` this process computes on."""
        raise NotImplementedError

    def activate(self, local_rank: int = 0) -> contextlib.AbstractContextManager:
        """Bind this process to its device and apply the backend's adaptations for the run."""
        return contextlib.nullcontext()

    def manual_seed(self, seed: int) -> None:
        """Seed every generator the model uses, including megatron-core's RNG tracker."""
        raise NotImplementedError

    def rng_state(self) -> dict[str, Any]:
        """All RNG states, for an exact resume."""
        raise NotImplementedError

    def set_rng_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def memory_stats(self) -> dict[str, float]:
        """``{"peak_gib": ..., "allocated_gib": ...}`` for logging; empty when unknown."""
        return {}

    def reset_peak_memory(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def layer_spec(self, config: Any, model_cfg: Any):
        """The transformer layer ``ModuleSpec`` this device prefers for ``model_cfg`` (with sequence
        parallelism, a ``TransformerBlock`` spec: see ``loongforge.modules.layer_spec.local_sdpa_spec``)."""
        from loongforge.modules.layer_spec import local_sdpa_spec

        return local_sdpa_spec(config)

    def peak_flops(self, dtype: str) -> float | None:
        """Dense peak FLOP/s of one device for ``dtype`` (for MFU); ``None`` when unknown."""
        return None

    def kernel(self, op: str):
        """The callable of the fused kernel this backend runs for operator ``op`` (e.g.
        ``"adamw_step"``), or ``None`` for the trainer's plain path."""
        return None

    def after_data_parallel(self, modules: list) -> None:
        """Adaptations that need the data-parallel wrappers' gradient buffers (``main_grad``), made
        once the trainer has wrapped ``modules`` (inside :meth:`activate`)."""
