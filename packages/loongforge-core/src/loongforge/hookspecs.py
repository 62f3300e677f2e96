"""The hooks a LoongForge plugin may implement.

Every hook is an empty function documented with when it is called and what it returns. A plugin is
a plain module with ``@loongforge.hookimpl`` functions named like these, registered under the
``loongforge.plugins`` entry-point group, and declaring ``LOONGFORGE_API_VERSION = "1.0"``.

Groups: registry hooks (``loongforge_register_*``, ``loongforge_config_dirs``), hardware-backend
hooks (``loongforge_register_backends``, ``loongforge_select_backend``, ``loongforge_layer_spec``),
parallel hooks (``loongforge_init_parallel``, ``loongforge_parallelize``) and trainer lifecycle
hooks (``loongforge_on_*``). Heavy types are imported only for type checking, so importing this
module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from loongforge.backend import Backend as BackendImpl
    from loongforge.registry import (
        Backend,
        CheckpointConverter,
        ConfigDir,
        ConfigSection,
        DatasetType,
        Kernel,
        ModelComponent,
        ModelFamily,
        Task,
        TokenizerType,
    )

hookspec = pluggy.HookspecMarker("loongforge")


# --- registry hooks ---------------------------------------------------------------------------


@hookspec
def loongforge_register_models() -> list[ModelFamily]:
    """Model families this plugin provides. Called once when the registry is built.

    Example::

        @hookimpl
        def loongforge_register_models():
            return [ModelFamily(name="qwen3", builder="my_pkg.qwen3:build", hf_model_types=("qwen3",))]
    """


@hookspec
def loongforge_register_model_components() -> list[ModelComponent]:
    """Reusable model parts (vision encoders, projectors, ...), each with a ``kind``.

    Example: ``[ModelComponent(name="siglip", kind="image_encoder", builder="pkg.siglip:build")]``.
    """


@hookspec
def loongforge_register_datasets() -> list[DatasetType]:
    """Dataset formats selectable as ``data.format``.

    Example: ``[DatasetType(name="webdataset", builder="pkg.wds:build")]``.
    """


@hookspec
def loongforge_register_tokenizers() -> list[TokenizerType]:
    """Tokenizer loaders selectable as ``tokenizer.type``.

    Example: ``[TokenizerType(name="sentencepiece", loader="pkg.sp:load")]``.
    """


@hookspec
def loongforge_register_checkpoint_converters() -> list[CheckpointConverter]:
    """Checkpoint format converters reachable as ``loongforge convert NAME``.

    Example: ``[CheckpointConverter(name="hf-to-mcore", run="pkg.convert:hf_to_mcore")]``.
    """


@hookspec
def loongforge_register_kernels() -> list[Kernel]:
    """Fused operators with their torch references; the backend picks them per device.

    Example: ``[Kernel(name="triton_rmsnorm", op="rmsnorm", impl="pkg.k:rms_norm", reference="pkg.k:ref")]``.
    """


@hookspec
def loongforge_register_tasks() -> list[Task]:
    """Runnable tasks, selected by the config key ``task``: a ``loongforge.task.TrainTask``
    subclass that the core's trainer runs (see ``loongforge/task.py`` for the contract).

    Example: ``[Task(name="wan_pretrain", task="pkg.task:WanTask", generate="pkg.sample:generate")]``.
    """


@hookspec
def loongforge_register_config_sections() -> list[ConfigSection]:
    """Top-level config sections this plugin's tasks read, each validated by its dataclass.

    Example: ``[ConfigSection(name="diffusion", schema="pkg.config:DiffusionConfig")]``; a run then
    sets ``diffusion.shift=5.0`` and an unknown ``diffusion.*`` key fails naming it.
    """


@hookspec
def loongforge_config_dirs() -> list[ConfigDir]:
    """Hydra config search paths (``pkg://package.configs``) holding this plugin's config groups.

    Example: ``[ConfigDir(path="pkg://loongforge_llm.configs", provider="llm")]``.
    """


# --- hardware-backend hooks ----------------------------------------------------------------------


@hookspec
def loongforge_register_backends() -> list[Backend]:
    """Hardware backends this plugin provides (device, collectives, RNG, memory stats, layer spec).

    Example: ``[Backend(name="cuda", factory="loongforge_cuda.backend:CudaBackend", priority=100)]``.
    """


@hookspec(firstresult=True)
def loongforge_select_backend(available: list[BackendImpl], requested: str | None) -> BackendImpl | None:
    """Choose the backend for this run among the ones whose ``is_available()`` is true.

    ``requested`` is the config's ``backend`` (``None`` for automatic). The core's default
    (``trylast``) honours ``requested`` or else picks the highest priority.
    """


@hookspec(firstresult=True)
def loongforge_layer_spec(backend: BackendImpl, config: Any, model_cfg: Any) -> Any | None:
    """Return a megatron-core ``ModuleSpec`` for a transformer layer, or ``None`` to defer.

    Called when a model builds its layers: every provider gets its spec through
    ``loongforge.model_provider.transformer_layer_spec``, which calls this hook; the default asks
    ``backend.layer_spec``. A plugin that wants its own attention or MLP modules for some model
    returns a spec here.
    """


# --- parallel hooks ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def loongforge_init_parallel(cfg: Any, backend: BackendImpl) -> Any | None:
    """Create the process groups for the run's parallel layout and return them.

    Called once per process after ``torch.distributed`` is initialised. The default builds
    megatron-core's parallel state from ``cfg.parallel`` and returns its ``ProcessGroupCollection``.
    """


@hookspec(firstresult=True)
def loongforge_parallelize(name: str, modules: list[Any], cfg: Any, backend: BackendImpl) -> list[Any] | None:
    """Wrap the model chunks of component ``name`` for data parallelism (and anything else).

    The default wraps each chunk in megatron-core's ``DistributedDataParallel``; order of
    application is fixed: recompute/compile (model build) -> data parallel (here) -> optimizer.
    """


# --- trainer lifecycle hooks ---------------------------------------------------------------------


@hookspec
def loongforge_on_train_start(trainer: Any) -> None:
    """After the model, optimizer and data are built (and a checkpoint is loaded), before step 1."""


@hookspec
def loongforge_on_step_end(trainer: Any, step: int, metrics: dict[str, float]) -> None:
    """After each optimizer step with that step's metrics (loss, lr, grad_norm, tokens_per_s, ...)."""


@hookspec
def loongforge_on_evaluate(trainer: Any, step: int, metrics: dict[str, float]) -> None:
    """After each evaluation with the validation metrics."""


@hookspec
def loongforge_on_checkpoint_save(trainer: Any, step: int, path: str) -> None:
    """After a checkpoint is completely written and the ``latest`` pointer moved to it."""


@hookspec
def loongforge_on_checkpoint_load(trainer: Any, step: int, path: str) -> None:
    """After a checkpoint is loaded, before training resumes from ``step``."""


@hookspec
def loongforge_on_train_end(trainer: Any) -> None:
    """After the last step (and the final checkpoint), before the process exits."""
