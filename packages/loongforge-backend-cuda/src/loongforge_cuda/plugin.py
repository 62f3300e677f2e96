"""Entry point of ``loongforge-backend-cuda``."""

from loongforge import hookimpl
from loongforge.registry import Backend, Kernel

from loongforge_cuda import flash_attn

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_backends():
    return [Backend(name="cuda", factory="loongforge_cuda.backend:CudaBackend", priority=100,
                    description="NVIDIA GPUs: NCCL, CUDA RNG tracker, SDPA/cuDNN attention")]


@hookimpl
def loongforge_register_kernels():
    """The installed flash-attention generations, each an attention candidate of its own."""
    return [Kernel(name=name, op=name, impl=f"loongforge_cuda.flash_attn:{name}",
                   reference="loongforge_cuda.flash_attn:attention_reference", device_types=("cuda",),
                   description=f"Dao-AILab flash-attention ({flash_attn.MODULES[name]}), timed per shape "
                               "against torch's SDPA kernels")
            for name in flash_attn.installed()]
