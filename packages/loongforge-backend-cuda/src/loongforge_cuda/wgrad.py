"""Weight gradients accumulated by the GEMM straight into megatron-core DDP's ``main_grad``.

Without apex, megatron-core's linear layers compute each weight gradient as a bf16 tensor and DDP's
backward hook adds it to the fp32 ``main_grad``: a mixed-dtype elementwise pass over every weight
(~5.5 ms a step for the Llama-3.2-1B shape at micro batch 8 on an H100) plus the bf16 tensor's
write and read. megatron-core's ``gradient_accumulation_fusion`` instead has the weight-gradient
GEMM add into ``main_grad`` itself (fp32 output, beta 1); it calls apex's
``fused_weight_gradient_mlp_cuda``, which :class:`TorchWgradAccumulation` provides with
``torch.addmm(..., out_dtype=torch.float32, out=main_grad)``.

:func:`wgrad_accumulation_patch` gives megatron-core that module (unless apex's is installed) and
:func:`fuse_wgrad_accumulation` turns the fusion on, after DDP has created the ``main_grad``s, for
the linear layers whose weights have one: a layer without DDP (inference, frozen LoRA base
weights) keeps megatron's default path.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


class TorchWgradAccumulation:
    """apex's ``fused_weight_gradient_mlp_cuda`` interface on torch: ``main_grad += grad_output.T @
    input`` with 2-D operands, accumulated in fp32."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
        a, b = grad_output.t(), total_input
        if a.dtype == main_grad.dtype:
            main_grad.addmm_(a, b)
        elif main_grad.is_cuda:  # cuBLAS: bf16 operands, fp32 accumulator read and written in place
            torch.addmm(main_grad, a, b, out_dtype=torch.float32, out=main_grad)
        else:  # torch's CPU kernels have no mixed-dtype addmm: upcast (exact)
            main_grad.addmm_(a.float(), b.float())

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
        main_grad.addmm_(grad_output.t(), total_input)


@contextlib.contextmanager
def wgrad_accumulation_patch():
    """While active, megatron-core's linear layers find ``fused_weight_gradient_mlp_cuda`` (apex's,
    when installed; else :class:`TorchWgradAccumulation`)."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is not None:
        yield
        return
    with mock.patch.object(layers, "fused_weight_gradient_mlp_cuda", TorchWgradAccumulation, create=True):
        yield


def fuse_wgrad_accumulation(modules) -> int:
    """Turn on gradient-accumulation fusion in every megatron-core Column/RowParallelLinear of
    ``modules`` whose weight is trained and has a ``main_grad`` (DDP's buffer, fp32 or bf16).
    Returns how many layers were switched."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    switched = 0
    for root in modules:
        for module in root.modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and weight is not None
                    and weight.requires_grad
                    and getattr(weight, "main_grad", None) is not None
                    and weight.main_grad.dtype in (torch.float32, torch.bfloat16, torch.float16)):
                module.gradient_accumulation_fusion = True
                switched += 1
    return switched
