"""Entry point of ``loongforge-ckpt``: the checkpoint converters and ``checkpoint.save_hf``.

* ``loongforge convert hf-to-mcore HF_DIR OUT_DIR [--tp N --pp M]``
* ``loongforge convert mcore-to-hf CKPT_DIR OUT_DIR [--max-shard-size 5GB]``
* ``checkpoint.save_hf=true`` in a run: after the final checkpoint, ``<checkpoint dir>/hf/``
  (and ``hf_step_N/`` every ``checkpoint.save_hf_interval`` steps).

Importing this module imports no torch.
"""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import CheckpointConverter

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_checkpoint_converters():
    return [
        CheckpointConverter(name="hf-to-mcore", run="loongforge_ckpt.hf_to_mcore:main",
                            description="HF safetensors model dir -> LoongForge native checkpoint (streaming)"),
        CheckpointConverter(name="mcore-to-hf", run="loongforge_ckpt.mcore_to_hf:main",
                            description="LoongForge native checkpoint (any TP/PP) -> HF safetensors model dir"),
    ]


@hookimpl
def loongforge_on_checkpoint_save(trainer, step, path):
    """``checkpoint.save_hf=true``: export the final checkpoint as ``<checkpoint dir>/hf/`` and,
    with ``checkpoint.save_hf_interval=N``, each checkpoint saved at a multiple of N steps as
    ``<checkpoint dir>/hf_step_<N>/``."""
    checkpoint = trainer.cfg.checkpoint
    if not checkpoint.get("save_hf", False):
        return
    interval = checkpoint.get("save_hf_interval", 0) or 0
    if step >= trainer.cfg.train.steps:
        name = "hf"
    elif interval and step % interval == 0:
        name = f"hf_step_{step:08d}"
    else:
        return
    from loongforge_ckpt.save_hf import export_hf_after_save

    export_hf_after_save(trainer, path, name)
