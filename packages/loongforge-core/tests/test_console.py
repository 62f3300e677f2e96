"""A quiet console: library warnings and log messages go to ``<output_dir>/run.log``, ours stay
on stderr, ``LOONGFORGE_VERBOSE=1`` shows everything; a clean first run prints no third-party
warning and no "Overwriting old incomplete / corrupted checkpoint"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from loongforge.console import ENV_VERBOSE
from loongforge.testing import run_cli

#: run in a fresh interpreter: pytest's own warning capture would stand between us and stderr
EMIT = """
import logging, sys, warnings
from pathlib import Path
import loongforge
from loongforge.console import quiet_console

ours = str(Path(loongforge.__file__).parent / "trainer" / "loop.py")
theirs = "/somewhere/site-packages/megatron/core/optimizer/__init__.py"
warnings.simplefilter("always")
shown, root_handlers = warnings.showwarning, list(logging.getLogger().handlers)
with quiet_console(sys.argv[1]):
    warnings.warn_explicit("Transformer Engine and Apex are not installed", UserWarning, theirs, 25)
    warnings.warn_explicit("invalid escape sequence", SyntaxWarning, theirs, 426)
    warnings.warn_explicit("scheduler.warmup_steps too large", UserWarning, ours, 70)
    logging.getLogger("megatron.core.dist_checkpointing").warning("MCore's async save is deprecated")
    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
    logging.getLogger("loongforge.data.builder").warning("our own log warning")
assert warnings.showwarning is shown and logging.getLogger().handlers == root_handlers
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_messages_go_to_the_run_log(tmp_path, verbose):
    out = subprocess.run([sys.executable, "-c", EMIT, str(tmp_path / "out")], capture_output=True, text=True,
                         env={**os.environ, ENV_VERBOSE: "1" if verbose else "0"}, timeout=120)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "out" / "run.log").read_text()
    for message in ("Apex are not installed", "invalid escape sequence", "async save is deprecated",
                    "No CUDA runtime", "warmup_steps", "our own log warning"):
        assert message in text, message
    for ours in ("warmup_steps", "our own log warning"):  # ours are always shown
        assert ours in out.stderr
    for theirs in ("Apex are not installed", "SyntaxWarning", "async save is deprecated", "No CUDA runtime"):
        assert (theirs in out.stderr) == verbose, (theirs, out.stderr)


@pytest.mark.slow
def test_first_run_console_is_quiet(tmp_path):
    result = run_cli("run", "train.steps=2", "train.eval_interval=0", "checkpoint.save_interval=2",
                     "scheduler.warmup_steps=1", f"output_dir={tmp_path / 'out'}", cwd=tmp_path,
                     env={"LOONGFORGE_LOAD_PLUGINS": "llm", ENV_VERBOSE: "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
    noisy = [line for line in result.stderr.splitlines() if "Warning" in line or "warnings.warn" in line
             or "Overwriting" in line or "No CUDA runtime" in line]
    assert not noisy, "\n".join(noisy)
    log = (tmp_path / "out" / "run.log").read_text()
    assert "UserWarning: Transformer Engine and Apex are not installed" in log
    assert "megatron.core" in log  # megatron-core's own log records
    assert "Overwriting old incomplete" not in log  # the checkpoint directory is empty when megatron saves
