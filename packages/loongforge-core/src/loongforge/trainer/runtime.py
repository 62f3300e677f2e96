"""Process start-up: torch.distributed, the backend, megatron-core's parallel state."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from loongforge.backend import Backend
from loongforge.parallel import validate_layout
from loongforge.registry import load_object
from loongforge.trainer.multi_tensor import foreach_multi_tensor_ops


@dataclass
class Runtime:
    """What one training process knows about where it runs."""

    backend: Backend
    layout: Any
    rank: int
    world_size: int
    local_rank: int
    pg_collection: Any = None
    plugins: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def available_backends(registry) -> list[Backend]:
    available = []
    for record in registry.backends.values():
        backend = load_object(record.factory)()
        if backend.is_available():
            backend.priority = record.priority
            available.append(backend)
    return available


def select_backend(plugins, requested: str | None) -> Backend:
    return plugins.hook.loongforge_select_backend(
        available=available_backends(plugins.registry()), requested=requested
    )


@contextlib.contextmanager
def runtime(cfg, plugins):
    """Initialise distributed state for ``cfg`` (torchrun's env, or a world of one) and tear it down."""
    from megatron.core import parallel_state

    backend = select_backend(plugins, cfg.backend)
    if hasattr(backend, "configure_kernels"):  # the fused kernels a backend plugs in, minus kernels.disable
        backend.configure_kernels(plugins.registry().kernels.values(), list(cfg.kernels.disable))
    launched = "RANK" in os.environ  # by torchrun; otherwise a world of one
    rank, world, local_rank = ((int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
                               if launched else (0, 1, 0))
    m = cfg.model
    experts = m.get("num_experts") or m.get("num_local_experts") or m.get("n_routed_experts")
    layout = validate_layout(cfg, world, m.get("num_hidden_layers"), m.get("num_attention_heads"),
                             m.get("num_key_value_heads"), experts)
    with backend.activate(local_rank), foreach_multi_tensor_ops():
        # a world of one rendezvous in memory: no port to race for with other runs on the machine
        store = None if launched else dist.HashStore()
        dist.init_process_group(backend.collective_backend, rank=rank, world_size=world, store=store,
                                timeout=datetime.timedelta(minutes=10))
        try:
            pg = plugins.hook.loongforge_init_parallel(cfg=cfg, backend=backend)
            yield Runtime(backend, layout, rank, world, local_rank, pg, plugins)
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
