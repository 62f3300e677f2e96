"""Model parallelism on CPU with real gloo processes: 2 processes equal one (loss and gradients).

* Ulysses context parallelism over video tokens (stacked and packed clips, per-token timesteps);
* tensor parallelism (fused qkv / kv, MLP, q/k RMSNorm across heads all-reducing over TP).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from loongforge.testing import free_port


@pytest.mark.parametrize("worker", ["cp_worker.py", "tp_worker.py"])
def test_two_processes_equal_one(worker):
    path = Path(__file__).with_name(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith(("ok", "FAIL"))]
    assert line and line[0].startswith("ok"), out.stdout[-2000:]
