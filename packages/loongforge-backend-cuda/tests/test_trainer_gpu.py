"""The trainer end to end on a GPU with the CUDA backend and every registered kernel (bf16, fused
layers, weight-gradient accumulation into DDP's buffer, the adamw_step optimizer kernel with
clipping folded in): the embedded default config trains, checkpoints, and a run stopped after 3
steps and resumed continues like the uninterrupted run. Skipped without CUDA; run with
``pytest -m gpu`` on the device machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from loongforge.testing import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# decay_steps fixed: the stopped run's train.steps=3 must not shorten the LR schedule it checkpoints
OVERRIDES = ("train.steps=6", "train.precision=bf16", "train.eval_interval=100", "train.log_interval=1",
             "checkpoint.save_interval=3", "scheduler.warmup_steps=2", "scheduler.decay_steps=6")


def train(out: Path, *overrides: str) -> list[float]:
    # one attention kernel for both runs, whatever the per-shape timings say
    result = run_cli("run", f"output_dir={out}", *OVERRIDES, *overrides, env={"LOONGFORGE_SDPA_BACKEND": "cudnn"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_default_config_trains_and_resumes_on_gpu(tmp_path):
    full = train(tmp_path / "full")
    train(tmp_path / "part", "train.steps=3")
    resumed = train(tmp_path / "part")  # same output dir: resumes at step 3
    print("uninterrupted:", full, "\nresumed:      ", resumed)
    assert len(full) == len(resumed) == 6
    assert full[-1] < full[0]
    assert resumed[:3] == full[:3]
    # GPU kernels need not be bitwise deterministic between processes (atomics in the embedding
    # backward); the resumed steps agree to bf16 training noise
    assert resumed[3:] == pytest.approx(full[3:], rel=2e-3)
