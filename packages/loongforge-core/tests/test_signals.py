"""Stopping a run: SIGTERM/SIGINT save a complete checkpoint and exit 75 with one line; a second
signal exits at once; kill -9 of the launching process leaves no descendant alive. Real runs
(the example plugin on the CPU backend), single-process and 2-process (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from loongforge.trainer.signals import EXIT_INTERRUPTED

RUN_YAML = """\
defaults:
  - /models/tiny_gpt@model: tiny_gpt_2l
  - _self_
model: {vocab_size: 1024, hidden_size: 32}
train: {steps: 100000, seq_length: 32, micro_batch_size: 2, global_batch_size: 4}
scheduler: {warmup_steps: 1}
checkpoint: {keep_last: 3}
logging: {progress: false, tensorboard: false, loss_curve: false}
"""


def start(site: Path, tmp: Path, *args: str) -> subprocess.Popen:
    (tmp / "run.yaml").write_text(RUN_YAML)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "LOONGFORGE_LOAD_PLUGINS": "example"}
    return subprocess.Popen([sys.executable, "-m", "loongforge.cli", "run", str(tmp / "run.yaml"),
                             f"output_dir={tmp / 'out'}", *args], cwd=tmp, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def steps_logged(tmp: Path) -> int:
    path = tmp / "out" / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"train"' in line) if path.is_file() else 0


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the run made no progress")
        time.sleep(0.2)


def complete(ckpts: Path) -> bool:
    latest = ckpts / "latest"
    return not latest.is_file() or (ckpts / latest.read_text() / "trainer_state.json").is_file()


@pytest.mark.parametrize(("sig", "launch"), [(signal.SIGTERM, ()), (signal.SIGINT, ()),
                                             (signal.SIGTERM, ("--nproc-per-node", "2"))])
def test_signal_saves_a_checkpoint_and_exits_75(third_party_site, tmp_path, sig, launch):
    proc = start(third_party_site, tmp_path, *launch)
    wait_until(lambda: steps_logged(tmp_path) >= 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    step = json.loads((tmp_path / "out" / "checkpoints" / f"step_{steps_logged(tmp_path):08d}"
                       / "trainer_state.json").read_text())["step"]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    lines = [line for line in err.splitlines() if "stopped by" in line]
    assert lines == [f"stopped by {sig.name} at step {step}; checkpoint saved: "
                     f"{tmp_path / 'out' / 'checkpoints' / f'step_{step:08d}'} "
                     "(a run with checkpoint.load=auto, the default, resumes from it)"]
    assert "Traceback" not in err


def test_second_signal_exits_at_once_leaving_a_complete_checkpoint(third_party_site, tmp_path):
    proc = start(third_party_site, tmp_path, "checkpoint.save_interval=1")
    ckpts = tmp_path / "out" / "checkpoints"
    wait_until(lambda: (ckpts / "latest").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode in (128 + signal.SIGTERM, EXIT_INTERRUPTED)  # the first one may be done already
    assert complete(ckpts)


@pytest.mark.parametrize("launch", [(), ("--nproc-per-node", "2")])
def test_kill_9_leaves_no_descendant(third_party_site, tmp_path, launch):
    proc = start(third_party_site, tmp_path, "checkpoint.save_interval=1", *launch)
    wait_until(lambda: (tmp_path / "out" / "checkpoints" / "latest").is_file(), proc)
    time.sleep(1)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    # the helper megatron-core's checkpoint writer spawns (a multiprocessing manager) is among them
    assert any("multiprocessing" in " ".join(p.cmdline()) for p in descendants), [p.cmdline() for p in descendants]
    proc.kill()
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(descendants, timeout=10)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
