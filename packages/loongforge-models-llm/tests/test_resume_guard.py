"""Resume never loads the wrong model: a Qwen3 checkpoint resumed as another family or size is
refused before anything is loaded, naming each key with both values (a real tiny run)."""

from __future__ import annotations

import pytest
from loongforge.testing import run_cli

RUN_YAML = """\
defaults:
  - /models/qwen3@model: qwen3_tiny
  - _self_
model: {vocab_size: 1024}
data: {valid_fraction: 0}
train: {steps: 2, seq_length: 32, micro_batch_size: 2, global_batch_size: 2}
scheduler: {warmup_steps: 1}
logging: {progress: false, tensorboard: false, loss_curve: false}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_guard")
    (tmp / "run.yaml").write_text(RUN_YAML)
    result = run_cli("run", str(tmp / "run.yaml"), f"output_dir={tmp / 'out'}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.mark.parametrize(("overrides", "expected"), [
    # same tensor shapes as qwen3_tiny except the QK-norm weights: resumed silently before
    (["model.family=llama"], ["model.family: 'qwen3' in the checkpoint, 'llama' in this run",
                              "model.qk_norm: True in the checkpoint, False in this run"]),
    (["model.hidden_size=32"], ["model.hidden_size: 64 in the checkpoint, 32 in this run"]),
    (["model.tie_word_embeddings=false"], ["model.tie_word_embeddings: True in the checkpoint, False in this run"]),
    (["model.rope_theta=10000.0"], ["model.rope_theta: 1000000.0 in the checkpoint, 10000.0 in this run"]),
])
def test_resume_as_another_model_is_refused(trained, overrides, expected):
    ckpts = trained / "out" / "checkpoints"
    before = {p: (ckpts / p).read_text() for p in ("latest", "config.yaml")}
    result = run_cli("run", str(trained / "run.yaml"), f"output_dir={trained / 'out'}", "train.steps=4", *overrides,
                     cwd=trained)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: checkpoint {ckpts / 'step_00000002'} was trained as another model")
    for text in expected:
        assert text in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert {p: (ckpts / p).read_text() for p in before} == before  # latest and config.yaml untouched


def test_changed_schedule_still_resumes(trained):
    result = run_cli("run", str(trained / "run.yaml"), f"output_dir={trained / 'out'}", "train.steps=3",
                     "model.fusions=false", "model.initializer_range=0.01", cwd=trained)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (trained / "out" / "checkpoints" / "latest").read_text() == "step_00000003"
    assert "LR schedule follows the config" in result.stderr
