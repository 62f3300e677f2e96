"""Entry point of ``loongforge-backend-xpu``."""

from loongforge import hookimpl
from loongforge.registry import Backend

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_backends():
    return [Backend(name="xpu", factory="loongforge_xpu.backend:XpuBackend", priority=90,
                    description="Intel GPUs through torch.xpu and the xccl collective backend")]
