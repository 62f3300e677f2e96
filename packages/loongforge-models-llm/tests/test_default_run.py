"""The embedded default (README's first command), shortened: loss falls, a loss curve is saved,
and ``loongforge generate`` continues a prompt from the checkpoint."""

from __future__ import annotations

import json

from loongforge.testing import run_cli


def test_default_run_learns_and_generates(tmp_path):
    out = tmp_path / "default"
    result = run_cli("run", "train.steps=40", "train.eval_interval=20", "checkpoint.save_interval=20",
                     "logging.progress=false", f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    valid = [r["loss"] for r in records if r["split"] == "valid"]
    print(f"train loss {train[0]:.3f} -> {train[-1]:.3f}; valid {valid}")
    assert len(train) == 4  # logged every train.log_interval=10 steps
    assert train[-1] < train[0] - 2.0
    assert valid[-1] < valid[0]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000040"
    assert (ckpts / "loss_curve.png").stat().st_size > 1000
    assert "loss:" in result.stdout and "(first step)" in result.stdout

    prompt = "Once upon a time"
    gen = run_cli("generate", str(ckpts), "--prompt", prompt, "--max-new-tokens", "12", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    text = gen.stdout.strip().splitlines()[-1]
    print("generated:", text)
    assert text.startswith(prompt) and len(text.split()) > len(prompt.split()) + 3
