"""Entry point of ``loongforge-backend-cuda``."""

from loongforge import hookimpl
from loongforge.registry import Backend

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_backends():
    return [Backend(name="cuda", factory="loongforge_cuda.backend:CudaBackend", priority=100,
                    description="NVIDIA GPUs: NCCL, CUDA RNG tracker, SDPA/cuDNN attention")]
