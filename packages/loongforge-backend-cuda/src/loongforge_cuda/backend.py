"""The CUDA backend: one GPU per process, NCCL collectives, megatron-core's CUDA RNG tracker, and
the fast layer: attention with the kernel measured fastest per shape (torch's SDPA kernels, our
Triton flash attention and Dao-AILab flash-attention where installed), plus the registered fused kernels
(RMSNorm, SwiGLU, RoPE, fused-QKV RoPE / QK-norm + RoPE, LM-head cross-entropy) minus ``kernels.disable``, and
weight-gradient GEMMs that accumulate into DDP's fp32 ``main_grad``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from loongforge.backend import Backend

#: dense peak FLOP/s per GPU by device name fragment and dtype (vendor datasheets, no sparsity)
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 67e12, "fp8": 1979e12},
    "H200": {"bf16": 989e12, "fp32": 67e12, "fp8": 1979e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


class CudaBackend(Backend):
    name = "cuda"
    collective_backend = "nccl"

    def __init__(self):
        #: ``{op: Kernel}`` in use; empty until :meth:`configure_kernels`
        self.kernels: dict = {}
        #: the ``precision.fp8`` section when FP8 is on (:meth:`configure_precision`), else None
        self.fp8 = None
        #: ``local`` (ours) or ``te`` (megatron-core's Transformer Engine spec)
        self.layer_spec_choice = "local"
        #: what :func:`loongforge_cuda.fp8.apply_fp8` changed (``.remove()`` undoes it)
        self.fp8_layers = None

    def configure_precision(self, precision) -> None:
        """Take the run's ``precision`` section: ``fp8`` (refused, naming the key, without a CUDA device
        of compute capability >= 8.9) and ``layer_spec`` (``te`` needs ``transformer_engine``)."""
        from loongforge_cuda.fp8 import check_fp8_config
        from loongforge_cuda.te import check_layer_spec

        self.layer_spec_choice = check_layer_spec(precision.get("layer_spec", "local"))
        fp8 = precision.get("fp8")
        available = torch.cuda.is_available()
        recipe = check_fp8_config(fp8, "cuda" if available else "cpu",
                                  torch.cuda.get_device_capability() if available else None)
        if recipe is not None and self.layer_spec_choice == "te":
            from loongforge.config import ConfigError

            raise ConfigError("config key 'precision.fp8.recipe': with precision.layer_spec=te, FP8 is "
                              "Transformer Engine's own (megatron's fp8 settings), not ours")
        self.fp8 = fp8 if recipe is not None else None

    def configure_kernels(self, kernels, disable=()) -> None:
        """Use the registered ``kernels`` (``loongforge.registry.Kernel`` records) except those
        named in ``disable`` (config key ``kernels.disable``: kernel or operator names)."""
        from loongforge_cuda.kernels import select_kernels

        self.kernels = select_kernels(kernels, disable, device_type="cuda")

    def kernel(self, op: str):
        """The callable of the active kernel for ``op``, or ``None``."""
        from loongforge_cuda.kernels import resolve

        return resolve(self.kernels, op)

    def layer_spec(self, config, model_cfg):
        """The local spec with measured SDPA core attention and the active fused modules (or, with
        ``precision.layer_spec=te``, megatron-core's Transformer Engine spec)."""
        from loongforge.modules.layer_spec import local_sdpa_spec

        if self.layer_spec_choice == "te":
            from loongforge_cuda.te import te_layer_spec

            return te_layer_spec(config)

        from loongforge_cuda.attention import MeasuredSDPAttention
        from loongforge_cuda.flash_attn import MODULES as FLASH_ATTN
        from loongforge_cuda.modules import apply_kernels

        candidates = {"triton": self.kernel("flash_attention")} | {name: self.kernel(name) for name in FLASH_ATTN}
        attention = MeasuredSDPAttention.with_kernels(candidates)
        # a block spec (where the pipeline split allows) so that the final norm is fused too
        spec = local_sdpa_spec(config, core_attention=attention, prefer_block="rmsnorm" in self.kernels)
        ops = ("rmsnorm", "add_rmsnorm", "swiglu", "qkv_rope")
        return apply_kernels(spec, {op: self.kernel(op) for op in ops if op in self.kernels})

    def output_processor(self, config):
        """A ``GPTModel.forward`` ``output_processor`` with the fused LM-head loss, or ``None``."""
        from loongforge_cuda.modules import fused_ce_output_processor

        ce = self.kernel("fused_linear_cross_entropy")
        return None if ce is None else fused_ce_output_processor(ce)

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device(self, local_rank: int | None = None) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)

    @contextlib.contextmanager
    def activate(self, local_rank: int = 0):
        from loongforge_cuda.modules import rope_patch
        from loongforge_cuda.wgrad import wgrad_accumulation_patch

        torch.cuda.set_device(local_rank)
        with rope_patch(lambda: self.kernel("rope")), wgrad_accumulation_patch():
            yield self

    def after_data_parallel(self, modules: list) -> None:
        """Weight-gradient GEMMs and the embedding / LM-head weight gradients accumulate straight
        into DDP's ``main_grad`` (see :mod:`loongforge_cuda.wgrad`,
        :mod:`loongforge_cuda.embedding_grad`); each layer's MLP residual add runs fused with the
        norm after it (:mod:`loongforge_cuda.residual_norm`)."""
        from loongforge_cuda.embedding_grad import fuse_embedding_grad_accumulation
        from loongforge_cuda.residual_norm import link_residual_norms
        from loongforge_cuda.wgrad import fuse_wgrad_accumulation

        fuse_wgrad_accumulation(modules)
        fuse_embedding_grad_accumulation(modules)
        link_residual_norms(modules)
        if self.fp8 is not None:  # after the wgrad fusion: FP8 weight gradients go into main_grad too
            from loongforge_cuda.fp8 import apply_fp8

            self.fp8_layers = apply_fp8(modules, self.fp8["recipe"], list(self.fp8.get("exclude", ())),
                                        float(self.fp8.get("error_budget", 0.08)))

    def manual_seed(self, seed: int) -> None:
        from megatron.core import tensor_parallel

        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def rng_state(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel import random as mcore_random

        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(),
                "tracker": mcore_random.get_cuda_rng_tracker().get_states()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        from megatron.core.tensor_parallel import random as mcore_random

        torch.set_rng_state(state["cpu"])
        torch.cuda.set_rng_state(state["cuda"])
        mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])

    def memory_stats(self) -> dict[str, float]:
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def peak_flops(self, dtype: str) -> float | None:
        """Dense peak FLOP/s for ``dtype`` (``bf16``, ``fp32``, ``fp8``)."""
        name = torch.cuda.get_device_name()
        for key, table in PEAK_FLOPS.items():
            if key in name:
                return table.get(dtype)
        return None
