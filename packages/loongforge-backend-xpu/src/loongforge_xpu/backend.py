"""The XPU backend: available when ``torch.xpu`` sees a device. Untested here (no XPU hardware);
megatron-core's CUDA-only calls would need the same kind of redirection as the CPU backend's."""

from __future__ import annotations

import contextlib

import torch
from loongforge.backend import Backend


class XpuBackend(Backend):
    name = "xpu"
    collective_backend = "xccl"
    supports_distributed_optimizer = False

    def is_available(self) -> bool:
        return hasattr(torch, "xpu") and torch.xpu.is_available()

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("xpu", local_rank)

    @contextlib.contextmanager
    def activate(self, local_rank: int = 0):
        torch.xpu.set_device(local_rank)
        yield self

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.xpu.manual_seed(seed)

    def memory_stats(self) -> dict[str, float]:
        return {"peak_gib": torch.xpu.max_memory_allocated() / 2**30}

    def synchronize(self) -> None:
        torch.xpu.synchronize()
