"""``kernels.disable`` through the trainer's runtime (its own module: the runtime starts its own
process group, so no other test's may be alive)."""

from __future__ import annotations

import pytest
from loongforge.config import ConfigError
from loongforge_cuda import flash_attn
from loongforge_cuda.backend import CudaBackend


def test_trainer_runtime_configures_kernels_from_config(monkeypatch):
    """``loongforge run ... kernels.disable=[...]`` reaches the backend before the model is built,
    and a name that matches no registered kernel stops the run with the config key."""
    from loongforge.backends.cpu import CpuBackend
    from loongforge.config.compose import compose_config
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer import runtime as rt

    class KernelRecordingCpu(CpuBackend):  # the CUDA backend's kernel choice, on a CPU device
        kernels: dict = {}
        configure_kernels = CudaBackend.configure_kernels

    plugins = get_plugin_manager()
    monkeypatch.setattr(rt, "select_backend", lambda plugins, requested: KernelRecordingCpu())
    cfg = compose_config("default", ["kernels.disable=[rope,triton_swiglu]"], registry=plugins.registry())
    with rt.runtime(cfg, plugins) as r:
        assert set(r.backend.kernels) == {"rmsnorm", "add_rmsnorm", "qkv_rope", "flash_attention",
                                           "fused_linear_cross_entropy", "adamw_step", "lightning_indexer",
                                           "sparse_mla_forward", *flash_attn.installed()}
    cfg = compose_config("default", ["kernels.disable=[ropee]"], registry=plugins.registry())
    with pytest.raises(ConfigError, match=r"kernels\.disable.*'ropee'"):
        with rt.runtime(cfg, plugins):
            pass
