"""`loongforge run qwen3_vl_tiny` trains on CPU: DeepStack layers, interleaved MRoPE and the Qwen3 ViT
in the core's training loop, with gradients reaching the DeepStack mergers."""

from __future__ import annotations

import re


def test_qwen3_vl_tiny_trains(tmp_path):
    from loongforge.testing import run_cli

    out = run_cli("run", "qwen3_vl_tiny", f"output_dir={tmp_path}", "train.steps=8", timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "vlm data: 64 conversations with 64 images; 0 skipped" in text
    first, last = map(float, re.search(r"loss: ([\d.]+) \(first step\) -> ([\d.]+) \(step 8\)", text).groups())
    assert last < first - 0.5, (first, last)
