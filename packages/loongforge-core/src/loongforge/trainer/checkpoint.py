"""Native training checkpoints: megatron-core distributed checkpointing, written atomically.

Layout of ``<dir>``::

    step_00000100/            one complete checkpoint (model + optimizer, resharding on load)
        trainer_state.json    step, consumed samples, scheduler state
        rng/rank_00000.safetensors
    latest                    text file naming the newest complete checkpoint

A checkpoint is written to ``step_N.tmp`` and renamed only when every rank has finished; ``latest``
is replaced atomically afterwards. A crash at any point leaves the previous checkpoint and pointer
intact. No pickle: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model
from safetensors.torch import load_file, save_file

from loongforge.trainer.compat import LATEST, CheckpointError, latest_checkpoint

__all__ = ["LATEST", "CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _sharded_state(chunks, optimizer, is_loading: bool = False) -> dict:
    state = {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}
    model_sd = {k: v for c in state.values() for k, v in c.items()}
    if optimizer is not None:
        # "fully_reshardable": the distributed optimizer's state is stored per parameter, so a
        # checkpoint loads under another TP/PP/DP layout
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
        )
    return state


def _flatten_rng(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_rng(value, name + "/"))
        else:
            flat[name] = value.contiguous()
    return flat


def _unflatten_rng(flat: dict[str, torch.Tensor]) -> dict:
    state: dict = {}
    for name, value in flat.items():
        node = state
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return state


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that a crash leaves the old content or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, chunks, optimizer, trainer_state: dict, backend,
                    keep_last: int | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` and move ``latest`` to it."""
    from loongforge.trainer.signals import guard_checkpoint_writer

    guard_checkpoint_writer()  # megatron's writer helper process dies with this one
    root = Path(root)
    final, tmp = _step_dir(root, step), _step_dir(root, step).with_suffix(".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded_state(chunks, optimizer), str(tmp))  # into an empty directory
    (tmp / "rng").mkdir(exist_ok=True)  # after megatron's save: it warns about a non-empty directory
    save_file(_flatten_rng(backend.rng_state()), str(tmp / "rng" / f"rank_{rank:05d}.safetensors"))
    if rank == 0:
        atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2))
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int | None) -> None:
    if not keep_last:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")
    for old in done[:-keep_last]:
        shutil.rmtree(old)



def load_checkpoint(path: str | Path, chunks, optimizer, backend, load_rng: bool = True) -> dict:
    """Load model (and optimizer, RNG) state in place; return the trainer state."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a LoongForge checkpoint (no trainer_state.json)")
    state = json.loads(state_file.read_text())
    if optimizer is not None and state.get("weights_only"):
        raise CheckpointError(f"{path} holds model weights only (no optimizer state; e.g. converted from HF): "
                              "load it with checkpoint.weights_only=true")
    loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer, is_loading=True), str(path))
    for i, chunk in enumerate(chunks):
        unwrap_model(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.safetensors"
    if load_rng and rng_file.is_file():
        backend.set_rng_state(_unflatten_rng(load_file(str(rng_file))))
    return state
