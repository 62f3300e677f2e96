"""The CUDA backend passes the core's backend conformance suite (``loongforge.backend_conformance``)
on a GPU: device, RNG state round trip, memory stats, peak FLOP/s, layer spec, the collectives on
NCCL in as many processes as there are GPUs (at least one), and 3 steps vs 2 steps + resume.
Skipped without CUDA; run with ``pytest -m gpu`` on the device machine."""

from __future__ import annotations

import pytest
import torch
from loongforge import backend_conformance as conformance

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = "loongforge_cuda.backend:CudaBackend"


@pytest.fixture(scope="module")
def cuda():
    return conformance.load_backend(CUDA)


def test_device_rng_memory_flops_layer_spec(cuda):
    conformance.check_device(cuda)
    conformance.check_rng(cuda)
    conformance.check_memory_stats(cuda)
    conformance.check_peak_flops(cuda)
    conformance.check_layer_spec(cuda)


def test_collectives_on_nccl():
    conformance.check_collectives(CUDA, world_size=max(1, min(2, torch.cuda.device_count())))


def test_three_steps_equal_two_steps_and_a_resume(tmp_path):
    # fp32, deterministic enough for a tight tolerance on one GPU
    conformance.check_training_resume("cuda", tmp_path, rtol=1e-5)
