"""The Kunlun (Kunlunxin) XPU backend. Untested on Kunlun hardware: detection, selection and
configuration are tested on the CPU against a stand-in for the vendor's PyTorch build.

Facts it rests on (public sources):

- Kunlun's PyTorch build is an extension module, ``torch_xmlir``; importing it registers the
  device, which it presents through the ``torch.cuda`` API (device type ``cuda``), so the device,
  RNG, memory and stream calls here are ``torch.cuda``'s. The SGLang Kunlun platform plugin
  (github.com/baidu-baige/sglang-kunlun, ``platform.py`` ``activate()``) and vLLM-Kunlun
  (github.com/baidu/vLLM-Kunlun, ``vllm_kunlun/platforms/kunlun.py``: ``device_type`` "cuda",
  ``dist_backend`` "nccl") detect and use it this way.
- Collectives run on BKCL (Kunlun's collective library). A build that registers a
  ``torch.distributed`` backend named ``"bkcl"`` gets it; the CUDA-compatible builds route
  ``"nccl"`` to BKCL (vLLM-Kunlun uses "nccl"), so that is the fallback.
- Visible devices: ``XPU_VISIBLE_DEVICES`` (PaddlePaddle FastDeploy's Kunlunxin deployment guide,
  docs/zh/usage/kunlunxin_xpu_deployment.md; CUDA-compatible builds also honour
  ``CUDA_VISIBLE_DEVICES``); BKCL is tuned with ``BKCL_*`` variables (same guide:
  ``BKCL_ENABLE_XDR``, ``BKCL_RDMA_NICS``, ``BKCL_PCIE_RING``, ...), passed through unchanged.
- Peak FLOP/s: no vendor datasheet figure we could cite, so ``None`` (no MFU shown).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Any

from loongforge.backend import Backend

#: Kunlun's PyTorch extension module
VENDOR_MODULE = "torch_xmlir"
#: environment variables that configure Kunlun devices and BKCL (reported by :meth:`environment`)
ENV_PREFIXES = ("XPU_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "BKCL_", "XSHMEM_")


def vendor_installed() -> bool:
    """Whether Kunlun's PyTorch extension is importable (nothing is imported)."""
    try:
        return importlib.util.find_spec(VENDOR_MODULE) is not None
    except (ImportError, ValueError):
        return False


class XpuBackend(Backend):
    """Kunlun XPU: the device through the ``torch.cuda`` API, collectives on BKCL."""

    name = "xpu"
    supports_distributed_optimizer = True

    def is_available(self) -> bool:
        if not vendor_installed():
            return False
        importlib.import_module(VENDOR_MODULE)  # registers the device with torch
        import torch

        return torch.cuda.is_available()

    @property
    def collective_backend(self) -> str:
        import torch.distributed as dist

        return "bkcl" if "bkcl" in dist.Backend.backend_list else "nccl"

    def environment(self) -> dict[str, str]:
        """The Kunlun/BKCL environment variables set for this process."""
        return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}

    def device(self, local_rank: int = 0):
        import torch

        return torch.device("cuda", local_rank)

    @contextlib.contextmanager
    def activate(self, local_rank: int = 0):
        import torch

        from loongforge_xpu import adaptations

        count = torch.cuda.device_count()
        if local_rank >= count:
            visible = {k: v for k, v in self.environment().items() if k.endswith("VISIBLE_DEVICES")}
            raise RuntimeError(f"Kunlun XPU: local rank {local_rank} needs device {local_rank}, but {count} "
                               f"are visible ({visible or 'XPU_VISIBLE_DEVICES unset'})")
        torch.cuda.set_device(local_rank)
        with adaptations.applied():
            yield self

    def manual_seed(self, seed: int) -> None:
        import torch
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import random as mcore_random

        torch.manual_seed(seed)
        ranks = {"tp_rank": 0, "ep_rank": 0, "etp_rank": 0}
        if parallel_state.model_parallel_is_initialized():
            ranks = {}
        mcore_random.model_parallel_cuda_manual_seed(seed, **ranks)

    def rng_state(self) -> dict[str, Any]:
        import torch
        from megatron.core.tensor_parallel import random as mcore_random

        return {"cpu": torch.get_rng_state(), "device": torch.cuda.get_rng_state(),
                "tracker": mcore_random.get_cuda_rng_tracker().get_states()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        import torch
        from megatron.core.tensor_parallel import random as mcore_random

        torch.set_rng_state(state["cpu"])
        torch.cuda.set_rng_state(state["device"])
        mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])

    def memory_stats(self) -> dict[str, float]:
        import torch

        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "allocated_gib": torch.cuda.memory_allocated() / 2**30}

    def reset_peak_memory(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def peak_flops(self, dtype: str) -> float | None:
        return None
