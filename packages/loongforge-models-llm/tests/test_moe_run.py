"""``loongforge run qwen3_moe_tiny``: the shipped MoE run config trains on the CPU (loss falls)
and saves a distributed checkpoint with the grouped experts."""

from __future__ import annotations

import json

from loongforge.testing import run_cli


def test_qwen3_moe_tiny_run_learns(tmp_path):
    out = tmp_path / "moe"
    result = run_cli("run", "qwen3_moe_tiny", "train.steps=30", "logging.progress=false", f"output_dir={out}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    print(f"qwen3_moe_tiny: train loss {train[0]:.3f} -> {train[-1]:.3f}")
    assert len(train) == 3 and train[-1] < train[0] - 1.0
    assert (out / "checkpoints" / "latest").read_text() == "step_00000030"
