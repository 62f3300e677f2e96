"""The trainer end to end on the CPU backend: exact resume, gradient accumulation, user errors.

Runs go through the real CLI in subprocesses (each a fresh megatron-core process), with the
example third-party model plugin, the shipped corpus and the shipped tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from loongforge.testing import run_cli

RUN_YAML = """\
defaults:
  - /models/tiny_gpt@model: tiny_gpt_2l
  - _self_
model: {vocab_size: 1024, hidden_size: 32}
train: {steps: 6, seq_length: 32, micro_batch_size: 2, global_batch_size: 4}
scheduler: {warmup_steps: 2, decay_steps: 6}
logging: {progress: false, tensorboard: false}
"""


def train(site: Path, workdir: Path, name: str, *overrides: str):
    config = workdir / "run.yaml"
    config.write_text(RUN_YAML)
    out = workdir / name
    result = run_cli("run", str(config), f"output_dir={out}", *overrides, extra_path=site, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_resume_continues_exactly(third_party_site, tmp_path):
    full, _ = train(third_party_site, tmp_path, "full")
    part, _ = train(third_party_site, tmp_path, "part", "train.steps=3")
    assert (part / "checkpoints" / "latest").read_text() == "step_00000003"
    resumed, result = train(third_party_site, tmp_path, "part")  # same output dir: resumes at 3
    full_losses, resumed_losses = train_losses(full), train_losses(resumed)
    print("uninterrupted:", full_losses, "\nresumed:     ", resumed_losses)
    assert len(resumed_losses) == 6
    assert resumed_losses == full_losses  # bit-identical, fp32 CPU


def test_resume_with_a_longer_run_follows_the_configured_schedule(third_party_site, tmp_path):
    """A run stopped at 3 steps under a 3-step schedule, resumed with a 6-step one: the new
    schedule applies from the checkpoint's step on (as the uninterrupted 6-step run), with a
    warning naming what changed."""
    full, _ = train(third_party_site, tmp_path, "full")
    train(third_party_site, tmp_path, "part", "train.steps=3", "scheduler.decay_steps=3")
    resumed, result = train(third_party_site, tmp_path, "part")
    assert "LR schedule follows the config" in result.stderr and "lr_decay_steps" not in result.stderr
    assert "scheduler.decay_steps (default: train.steps) 3 -> 6" in result.stderr
    assert train_losses(resumed)[3:] == train_losses(full)[3:]


def test_gradient_accumulation_matches_large_micro_batch(third_party_site, tmp_path):
    accumulated, _ = train(third_party_site, tmp_path, "acc", "train.micro_batch_size=1")
    single, _ = train(third_party_site, tmp_path, "big", "train.micro_batch_size=4")
    a, b = train_losses(accumulated), train_losses(single)
    print("4 x 1:", a, "\n1 x 4:", b)
    assert a == pytest.approx(b, rel=1e-5)


def test_crash_during_save_keeps_previous_checkpoint(third_party_site, tmp_path):
    out, _ = train(third_party_site, tmp_path, "run", "train.steps=3")
    ckpts = out / "checkpoints"
    # what a kill during the next save leaves behind: a half-written temporary directory
    shutil.copytree(ckpts / "step_00000003", ckpts / "step_00000006.tmp")
    (ckpts / "step_00000006.tmp" / "trainer_state.json").unlink()
    resumed, _ = train(third_party_site, tmp_path, "run")
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert len(train_losses(resumed)) == 6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.paths=[/nonexistent/corpus.jsonl]", "/nonexistent/corpus.jsonl"),
        ("model.vocab_size=512", "512"),
        ("parallel.tp=2", "world size 1 is not a multiple"),
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("model.family=qwen9", "model.family') 'qwen9'"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(third_party_site, tmp_path, override, message):
    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML)
    result = run_cli("run", str(config), f"output_dir={tmp_path / 'out'}", override,
                     extra_path=third_party_site, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
