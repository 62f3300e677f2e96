"""Entry point of ``loongforge-backend-xpu``. Imports no torch: availability is decided when the
backend is instantiated (``XpuBackend.is_available``)."""

from loongforge import hookimpl
from loongforge.registry import Backend

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_backends():
    # above the CUDA backend (100): Kunlun's PyTorch presents its device through torch.cuda, so the
    # CUDA backend would also find it available; this one is available only where torch_xmlir is
    return [Backend(name="xpu", factory="loongforge_xpu.backend:XpuBackend", priority=110,
                    description="Kunlun (Kunlunxin) XPU through its PyTorch build (torch_xmlir), BKCL collectives")]
