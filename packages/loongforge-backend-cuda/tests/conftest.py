"""Fixtures shared by the CUDA backend's GPU tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def cuda_mcore(monkeypatch_module):
    """megatron-core's parallel state in one NCCL process (the CUDA backend not activated: each test
    patches what it compares); exact fp32 matmuls (TF32 off), Triton kernels for CUDA tensors,
    torch's math SDPA everywhere."""
    import torch.distributed as dist
    from loongforge.testing import free_port
    from loongforge_cuda.backend import CudaBackend
    from megatron.core import parallel_state

    monkeypatch_module.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch_module.setenv("MASTER_PORT", str(free_port()))
    monkeypatch_module.setenv("LOONGFORGE_KERNELS_IMPL", "auto")  # CUDA tensors -> Triton
    # one attention kernel for every model compared, whatever the timings
    monkeypatch_module.setenv("LOONGFORGE_SDPA_BACKEND", "math")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        parallel_state.initialize_model_parallel(1, 1)
        CudaBackend().manual_seed(1)
        yield
        parallel_state.destroy_model_parallel()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        dist.destroy_process_group()
