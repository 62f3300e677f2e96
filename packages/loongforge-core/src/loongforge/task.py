"""The task contract: what a training task supplies, and what the core's trainer keeps.

A task is a :class:`TrainTask` subclass registered as ``Task(name=..., task="pkg.module:MyTask")``
through ``loongforge_register_tasks`` and selected by the config key ``task``. The core's trainer
(:class:`loongforge.trainer.loop.Trainer`) keeps everything that is not modality-specific: the
parallel layout and process groups, data-parallel wrapping (``loongforge_parallelize``), the
optimizer and LR schedule, the resumable data order, checkpoints and resume, metrics (loss,
throughput, MFU) and the lifecycle hooks. The task supplies the model, the data, the forward step
with its loss, and its FLOPs; it never subclasses the trainer.

Call order in every process (the trainer calls nothing else)::

    cfg = Task.resolve_config(cfg, plugins)     # once, before any process group
    task = Task(cfg, rt)                        # rt: loongforge.trainer.runtime.Runtime
    train, valid = task.build_datasets()
    chunks = task.build_model()                 # then: DP wrap, optimizer
    path = task.resume_from(path)               # the checkpoint to resume from (checkpoint.load)
    task.on_train_start(trainer)                # everything built, before step 1
    for each micro-batch: task.forward_step(task.collate(samples), model) -> (output, loss_fn)
    metrics |= task.step_metrics()              # after each optimizer step
    task.save_extra(ckpt_dir)                   # main rank, with every checkpoint
    result = task.summarize(trainer.fit())

Loss contract (megatron-core's per-token loss): ``loss_fn(output)`` returns ``(loss_sum, count,
logged)`` where ``loss_sum`` is the loss SUMMED over ``count`` units (an integer tensor: tokens or samples, see
:attr:`TrainTask.unit`) and ``logged`` holds at least ``{"loss_sum": ..., "tokens": count}``
(detached; the names in :attr:`TrainTask.logged_values` too). The trainer
divides gradients by the global count, so gradient accumulation and data parallelism give the
mean over the global batch.

The contract is part of the hook API (``loongforge.API_VERSION``): methods are only added, with a
default, in a minor version; a change of meaning is a new major. This module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from loongforge.trainer.runtime import Runtime


class TrainTask:
    """Base class of a training task; override the public methods below (defaults documented)."""

    #: what the loss is averaged over and what throughput counts: ``"tokens"`` or ``"samples"``
    unit: str = "tokens"
    #: names of further values in the loss function's ``logged`` dict (summed per unit, e.g. an
    #: auxiliary loss times the unit count), logged each step as their global mean per unit
    logged_values: tuple[str, ...] = ()

    @classmethod
    def resolve_config(cls, cfg: Any, plugins: Any) -> Any:
        """Check and complete ``cfg`` before any process starts (raise ``ConfigError`` naming the
        key). Called once, in the launching process too. Default: ``cfg`` unchanged."""
        return cfg

    def __init__(self, cfg: Any, rt: Runtime):
        self.cfg, self.rt = cfg, rt

    def build_datasets(self) -> tuple[Any, Any | None]:
        """``(train, valid or None)``: map-style datasets of samples. Called before :meth:`build_model`."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_datasets()")

    def build_model(self) -> list[Any]:
        """This rank's model chunks, one per virtual pipeline stage (usually one), on
        ``rt.backend.device()``, before data-parallel wrapping: pretrained weights loaded, frozen
        parameters with ``requires_grad=False``, bf16 runs wrapped (see
        ``loongforge.trainer.model.wrap_precision``). Each chunk has ``.config``, a megatron-core
        ``TransformerConfig`` (its DDP and optimizer read it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model()")

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        """Samples -> one micro-batch. Default: ``torch.utils.data.default_collate``."""
        from torch.utils.data import default_collate

        return default_collate(samples)

    def batch_sampler(self, dataset: Any, consumed_samples: int, training: bool) -> Any | None:
        """A batch sampler of this data-parallel rank's micro-batches from ``consumed_samples`` on,
        or ``None`` for the core's resumable, seeded one (the default)."""
        return None

    def forward_step(self, batch: dict[str, Any], model: Any) -> tuple[Any, Any]:
        """Run ``model`` on ``batch``; return ``(output, loss_fn)`` (see the loss contract above)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_step()")

    def units_per_sample(self) -> int:
        """Loss units per sample, for throughput: the sequence length for token tasks, 1 for sample tasks."""
        return 1

    def flops_per_unit(self) -> float | None:
        """Model FLOPs (forward + backward) of one unit, for MFU; ``None``: no MFU shown."""
        return None

    def resume_from(self, path: Path | None) -> Path | None:
        """The checkpoint the trainer resumes from, given the one ``checkpoint.load`` names (or
        ``None``). A task that used it itself (e.g. as frozen base weights) returns ``None``.
        Default: ``path``."""
        return path

    def on_train_start(self, trainer: Any) -> None:
        """Called once the trainer is built (model wrapped, optimizer, resume), before step 1,
        e.g. to print a summary. Default: nothing."""

    def step_metrics(self) -> dict[str, float]:
        """Further values to log with the step that just ended (this rank's view). Default: none."""
        return {}

    def save_extra(self, ckpt_dir: Path) -> None:
        """Write what a checkpoint needs beside the weights (tokenizer, processor, model config).
        Called on the main rank with every save. Default: nothing."""

    def summarize(self, result: dict[str, Any]) -> dict[str, Any]:
        """Add task-specific fields to the result of ``Trainer.fit()``. Default: unchanged."""
        return result
