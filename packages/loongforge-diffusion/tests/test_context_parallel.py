"""Ulysses context parallelism over video tokens: 2 gloo processes equal one (loss and gradients)."""

import os
import subprocess
import sys
from pathlib import Path

from loongforge.testing import free_port


def test_ulysses_cp2_equals_one_process():
    worker = Path(__file__).with_name("cp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", str(worker)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith(("ok", "FAIL"))]
    assert line and line[0].startswith("ok"), out.stdout[-2000:]
