"""Encoder data parallelism over the LLM's TP ranks (``components.image_split``), in 2 real gloo
processes: each rank encodes its share of the images, the gathered tokens equal one process's, and
the rank gradients averaged as megatron-core's ``finalize_model_grads`` averages parameters marked
``average_gradients_across_tp_domain`` equal one process's gradients. (The whole training step with
LLM TP=2: ``test_parallel.py``.)"""

from __future__ import annotations

import os

import torch
from loongforge_vlm.components.image_split import pixel_rows, shares


def test_shares_balance_rows_and_cover_every_image():
    assert shares([4, 4, 4, 4], 2) == [(0, 2), (2, 4)]
    assert shares([12, 2, 2, 2, 2, 2, 2], 2) == [(0, 1), (1, 7)]
    assert shares([5], 2) == [(0, 0), (0, 1)] or shares([5], 2) == [(0, 1), (1, 1)]
    for rows in ([3, 1, 4, 1, 5, 9, 2, 6], [1] * 7, [16, 16, 4]):
        for n in (1, 2, 3, 4):
            s = shares(rows, n)
            assert len(s) == n and s[0][0] == 0 and s[-1][1] == len(rows)
            assert all(a <= b == c for (a, b), (c, _) in zip(s, s[1:] + [(s[-1][1], None)], strict=True))
    assert pixel_rows(torch.zeros(10, 8), torch.tensor([[1, 2, 2], [1, 2, 3]])) == [4, 6]
    assert pixel_rows(torch.zeros(5, 3, 8, 8), torch.tensor([[3, 1, 1], [2, 1, 1]])) == [3, 2]


def test_split_encoding_equals_one_process(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("image_split_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(tmp_path / "out.pt")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        raise
    assert proc.returncode == 0, log[-3000:]
    res = torch.load(tmp_path / "out.pt", weights_only=True)
    assert res["share"] == (0, 1)  # rank 0 encodes 1 of the 3 images: 8 patches vs 24 + 4
    for f, s in zip(res["full"], res["split"], strict=True):  # summation order differs: compare norms
        assert f.norm() > 0 and ((s - f).norm() / f.norm()).item() < 1e-5
