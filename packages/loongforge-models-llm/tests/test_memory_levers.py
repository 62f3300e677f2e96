"""Optimizer memory levers through the real CLI and trainer (CPU, bf16, a tiny Llama): bf16 AdamW
moments (``precision.exp_avg_dtype/exp_avg_sq_dtype``) are saved and restored by the trainer's
checkpoints (a run stopped at 3 steps and resumed equals the uninterrupted 6-step run), and train
close to the fp32-moment run."""

from __future__ import annotations

import json

import pytest
from loongforge.testing import run_cli

RUN_YAML = """\
defaults:
  - /models/llama3@model: llama3_tiny
  - _self_
model: {vocab_size: 1024}
train: {steps: 6, seq_length: 32, micro_batch_size: 2, global_batch_size: 2, precision: bf16}
optimizer: {lr: 3.0e-3}
scheduler: {warmup_steps: 2, decay_steps: 6}
logging: {progress: false, tensorboard: false, loss_curve: false}
"""
BF16_MOMENTS = ("precision.exp_avg_dtype=bf16", "precision.exp_avg_sq_dtype=bf16")


def _run(tmp_path, name, *overrides):
    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML)
    out = tmp_path / name
    result = run_cli("run", str(config), f"output_dir={out}", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"], result


@pytest.mark.slow
def test_bf16_moments_resume_exactly_and_train_like_fp32_moments(tmp_path):
    full, result = _run(tmp_path, "full", *BF16_MOMENTS)
    _run(tmp_path, "part", *BF16_MOMENTS, "train.steps=3")
    resumed, _ = _run(tmp_path, "part", *BF16_MOMENTS)
    fp32, _ = _run(tmp_path, "fp32")
    print("bf16 moments:", full, "\nresumed:     ", resumed, "\nfp32 moments:", fp32)
    assert len(resumed) == 6 and resumed == full
    assert full == pytest.approx(fp32, rel=2e-2)
