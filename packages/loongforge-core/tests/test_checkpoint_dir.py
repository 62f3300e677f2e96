"""A run's checkpoint directory is its own: a fresh run does not mix its saves with another run's
(``checkpoint.overwrite``), and the final save is never skipped. Real runs through the CLI with
the example third-party plugin (its provider has no ``architecture()``: the ``model`` section is
compared as written)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from loongforge.testing import run_cli

RUN_YAML = """\
defaults:
  - /models/tiny_gpt@model: tiny_gpt_2l
  - _self_
model: {vocab_size: 1024, hidden_size: 32}
train: {steps: 3, seq_length: 32, micro_batch_size: 2, global_batch_size: 4}
scheduler: {warmup_steps: 1}
logging: {progress: false, tensorboard: false, loss_curve: false}
"""


def run(site: Path, workdir: Path, out: Path, *overrides: str):
    config = workdir / "run.yaml"
    config.write_text(RUN_YAML)
    return run_cli("run", str(config), f"output_dir={out}", *overrides, extra_path=site, cwd=workdir)


def test_fresh_run_into_another_runs_directory(third_party_site, tmp_path):
    out = tmp_path / "out"
    first = run(third_party_site, tmp_path, out, "seed=1")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = out / "checkpoints"
    state = (ckpts / "step_00000003" / "trainer_state.json").read_text()

    refused = run(third_party_site, tmp_path, out, "seed=2", "checkpoint.load=null")
    assert refused.returncode == 2, refused.stderr[-3000:]
    # one line (beside the warnings about the test site's broken plugins)
    assert len([line for line in refused.stderr.splitlines() if not line.startswith("warning: plugin")]) == 1
    assert f"checkpoint directory {ckpts} already holds another run's checkpoints (step_00000003)" in refused.stderr
    assert "checkpoint.overwrite=true" in refused.stderr and "Traceback" not in refused.stderr
    assert (ckpts / "step_00000003" / "trainer_state.json").read_text() == state  # untouched

    # overwrite: the old checkpoints go, and the final save of the same step number is not skipped
    # (before: `latest` already named step 3, so the new run ended without saving its weights)
    started = time.time()
    second = run(third_party_site, tmp_path, out, "seed=2", "checkpoint.load=null", "checkpoint.overwrite=true",
                 "train.steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / "step_00000003" / "trainer_state.json").stat().st_mtime >= started
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003"]


def test_resume_with_a_changed_model_section_is_refused(third_party_site, tmp_path):
    out = tmp_path / "out"
    assert run(third_party_site, tmp_path, out).returncode == 0
    config_before = (out / "checkpoints" / "config.yaml").read_text()
    refused = run(third_party_site, tmp_path, out, "train.steps=6", "model.num_attention_heads=2")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "model.num_attention_heads: 4 in the checkpoint, 2 in this run" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (out / "checkpoints" / "config.yaml").read_text() == config_before
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"


def test_final_save_after_an_interval_save_of_the_same_step(third_party_site, tmp_path):
    out = tmp_path / "out"
    result = run(third_party_site, tmp_path, out, "train.steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=5")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert json.loads((ckpts / "step_00000004" / "trainer_state.json").read_text())["step"] == 4
