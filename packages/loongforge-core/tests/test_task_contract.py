"""The task contract (``loongforge.task``): a third-party task with no tokenizer and no language
model (``tests/plugins/task_plugin``: learn y = W x, unit = samples) trains through the core's
trainer with its own config section, checkpoints, resumes exactly, and generates through its own
``generate``; one data-parallel layout matches the single process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from loongforge.testing import run_cli

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def task_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("task_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(REPO / "tests" / "plugins" / "task_plugin")],
                   check=True)
    return site


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(site, tmp_path, name, *overrides, nproc=None):
    out = tmp_path / name
    launch = ["--nproc-per-node", str(nproc)] if nproc else []
    r = run_cli("run", "toy_regression", f"output_dir={out}", *overrides, *launch, extra_path=site, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_a_task_without_tokenizer_trains_checkpoints_and_resumes(task_site, tmp_path):
    full, result = train(task_site, tmp_path, "full")
    recs = records(full)
    losses = [r["loss"] for r in recs]
    assert len(losses) == 20 and losses[-1] < 0.2 * losses[0]  # it learns
    assert all("samples_per_s" in r and "tokens_per_s" not in r for r in recs)  # unit = samples
    # the task's extra logged value: here the same sum as the loss, so its mean per unit equals it
    assert all(r["sq_error"] == pytest.approx(r["loss"], rel=1e-6) for r in recs)
    assert (full / "checkpoints" / "toy.txt").read_text() == "dim=8\n"  # save_extra
    assert "samples/s" in result.stdout

    part, _ = train(task_site, tmp_path, "part", "train.steps=8", "scheduler.decay_steps=20")
    resumed, _ = train(task_site, tmp_path, "part", "scheduler.decay_steps=20")
    assert [r["loss"] for r in records(resumed)] == losses  # bit-identical resume, fp32 CPU

    r = run_cli("generate", str(full / "checkpoints"), "--prompt", "hi", "--steps", "3", extra_path=task_site,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"toy generate from {full / 'checkpoints'} (prompt='hi', steps=3)"


def test_plugin_config_section_is_validated(task_site, tmp_path):
    r = run_cli("config", "show", "toy_regression", "toy.dimm=3", extra_path=task_site, cwd=tmp_path)
    assert r.returncode != 0
    assert "toy.dimm" in r.stderr and "'dim'" in r.stderr
    r = run_cli("config", "show", "toy_regression", "toy.dim=3", extra_path=task_site, cwd=tmp_path)
    assert r.returncode == 0 and "dim: 3" in r.stdout and "samples: 256" in r.stdout


@pytest.mark.slow
def test_data_parallel_loss_equals_one_process(task_site, tmp_path):
    one, _ = train(task_site, tmp_path, "one", "train.steps=4")
    two, _ = train(task_site, tmp_path, "two", "train.steps=4", nproc=2)
    a, b = [r["loss"] for r in records(one)], [r["loss"] for r in records(two)]
    assert b == pytest.approx(a, rel=1e-6)
