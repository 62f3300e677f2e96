"""Typed records that plugins hand to the core through the registry hooks.

Callables are named by import path (``"package.module:attr"``) so that discovering a plugin
imports no torch; :func:`load_object` resolves them when they are used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


def load_object(path: str) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ModelFamily:
    """A model family, e.g. ``qwen3``.

    ``builder``: a ``loongforge.model_provider.ModelProvider`` class, called with the ``model``
    config section. ``hf_model_types``: HF ``config.json`` ``model_type`` values this family
    loads (``model.pretrained`` picks the family by them). ``from_hf_config``:
    ``fn(hf_config: dict) -> dict``, the ``model`` section of an HF ``config.json`` (validated;
    refuses fields it does not implement); with it, ``model.pretrained`` is resolved when the
    config is composed (``loongforge.model_section``). ``config_groups``: the Hydra groups holding
    its sizes (a size named ``*_tiny`` is a test size). ``supported``: ``False`` when the family
    has no reference implementation it is proven against (listed apart by ``loongforge models``).
    """

    name: str
    builder: str
    hf_model_types: tuple[str, ...] = ()
    from_hf_config: str | None = None
    config_groups: tuple[str, ...] = ()
    supported: bool = True
    description: str = ""


@dataclass(frozen=True)
class ModelComponent:
    """A reusable model part (vision encoder, projector, ...); ``kind`` names its registry."""

    name: str
    kind: str
    builder: str
    description: str = ""


@dataclass(frozen=True)
class DatasetType:
    """A dataset format: ``builder(data_cfg, tokenizer, *, seq_length, seed) -> Dataset``."""

    name: str
    builder: str
    description: str = ""


@dataclass(frozen=True)
class TokenizerType:
    """A tokenizer loader: ``loader(tokenizer_cfg) -> tokenizer``."""

    name: str
    loader: str
    description: str = ""


@dataclass(frozen=True)
class CheckpointConverter:
    """A checkpoint format converter, e.g. ``hf-to-mcore``: ``run(src, dst, **options)``."""

    name: str
    run: str
    description: str = ""


@dataclass(frozen=True)
class Kernel:
    """A fused operator with its torch reference.

    ``op`` is the operation it implements (``rmsnorm``, ``swiglu``, ...); ``impl`` and
    ``reference`` share one signature; ``device_types`` are where ``impl`` runs.
    """

    name: str
    op: str
    impl: str
    reference: str
    device_types: tuple[str, ...] = ("cuda",)
    description: str = ""


@dataclass(frozen=True)
class Task:
    """A runnable task (``pretrain``, ``sft``, ...), selected by the config key ``task``.

    ``task``: a ``loongforge.task.TrainTask`` subclass, trained by the core's trainer (the usual
    case); or ``run``: ``fn(cfg, plugins)`` for a task that is not a training run. Exactly one of
    the two. ``generate``: ``fn(checkpoint, *, prompt, output, seed, num_steps) -> str``, what
    ``loongforge generate`` runs for a checkpoint of this task (a text continuation, a written
    file's path, ...); ``None``: the core's text generation.
    """

    name: str
    task: str | None = None
    run: str | None = None
    generate: str | None = None
    description: str = ""

    def __post_init__(self):
        if (self.task is None) == (self.run is None):
            raise ValueError(f"Task {self.name!r}: give exactly one of 'task' (a TrainTask) and 'run'")


@dataclass(frozen=True)
class ConfigSection:
    """A top-level config section a plugin adds (e.g. ``diffusion``), validated like the core's.

    ``schema``: a dataclass (``"pkg.module:Name"``) whose fields all have defaults; an unknown key
    in the section fails naming it, and ``cfg.<name>`` holds the defaults when a run sets nothing.
    """

    name: str
    schema: str
    description: str = ""


@dataclass(frozen=True)
class ConfigDir:
    """A Hydra config search path a plugin contributes, e.g. ``pkg://loongforge_llm.configs``."""

    path: str
    provider: str


@dataclass(frozen=True)
class Backend:
    """A hardware backend. ``factory() -> loongforge.backend.Backend``; ``priority``: higher wins
    among the available ones (the CPU reference backend has 0)."""

    name: str
    factory: str
    priority: int = 0
    description: str = ""


@dataclass
class Registry:
    """Everything the plugins registered, by kind and name."""

    models: dict[str, ModelFamily] = field(default_factory=dict)
    components: dict[str, ModelComponent] = field(default_factory=dict)
    datasets: dict[str, DatasetType] = field(default_factory=dict)
    tokenizers: dict[str, TokenizerType] = field(default_factory=dict)
    converters: dict[str, CheckpointConverter] = field(default_factory=dict)
    kernels: dict[str, Kernel] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    config_sections: dict[str, ConfigSection] = field(default_factory=dict)
    config_dirs: list[ConfigDir] = field(default_factory=list)
    #: which plugin registered each (kind, name)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
