"""Collectives and context-parallel attention on the CPU backend, in real gloo processes.

One launch of two processes runs every check in ``dist_worker.py``: gloo's collectives as
megatron-core calls them, the collectives the CPU backend supplies (``supplied_collectives``),
context-parallel attention against attention on the whole sequence (forward and backward), and
our CP batch split against megatron-core's ``get_batch_on_this_cp_rank``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = ("collectives", "supplied_collectives", "cp_attention", "cp_batch_layout", "cp_rope_follows_ids")


@pytest.fixture(scope="module")
def worker_output() -> str:
    from loongforge.testing import free_port

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(Path(__file__).with_name("dist_worker.py")), *CHECKS],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.parametrize("check", CHECKS)
def test_check_passes_on_two_gloo_ranks(worker_output, check):
    lines = [line for line in worker_output.splitlines() if line.startswith(f"{check} ok")]
    print(lines)
    assert lines, worker_output[-3000:]
