"""``checkpoint.save_hf=true``: the final native checkpoint exported as ``<checkpoint dir>/hf/``
(and, with ``checkpoint.save_hf_interval=N``, those saved at multiples of N as ``hf_step_N/``).

Rank 0 runs ``mcore-to-hf`` in a child process (``python -m loongforge_ckpt mcore-to-hf``), so the
training process's torch.distributed and megatron-core parallel state are untouched and the
conversion's memory is returned when it ends; every rank waits at a barrier until it is done.
The child reads the checkpoint just written (any TP/PP layout), ``config.yaml`` and
``tokenizer/`` from the checkpoints directory, and replaces ``hf/`` only once the new one is
complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from loongforge.errors import LoongForgeError

#: variables torchrun sets for its workers; the child is a world of its own
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class SaveHFError(LoongForgeError, RuntimeError):
    """The HF export of a checkpoint failed; the message carries the converter's output."""


def export_command(checkpoint: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "loongforge_ckpt", "mcore-to-hf", str(checkpoint), str(out), "--force"]


def export_hf_after_save(trainer, path: str, name: str = "hf") -> None:
    """Export checkpoint ``path`` as ``<checkpoint dir>/<name>/``; every rank calls this."""
    import torch.distributed as dist

    error = None
    if trainer.rt.is_main:
        out = Path(trainer.ckpt_dir) / name
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
        result = subprocess.run(export_command(path, out), capture_output=True, text=True, env=env)
        if result.returncode == 0:
            print(f"hf export: {out}", flush=True)
        else:
            error = (f"checkpoint.save_hf: exporting {path} to {out} failed (exit {result.returncode}):\n"
                     f"{(result.stdout + result.stderr)[-4000:]}")
    if dist.is_initialized():
        dist.barrier()
    if error:
        raise SaveHFError(error)
