"""The LoongForge plugin of ``loongforge-models-llm`` (entry point ``llm``).

Registers the dense and MoE decoder families and the ``models/<group>`` Hydra configs. Importing this
module imports no torch or megatron-core.
"""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import ConfigDir, ModelFamily

from loongforge_llm.families import FAMILIES

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_models():
    return [
        ModelFamily(
            name=f.name,
            builder=f.provider,
            hf_model_types=f.hf_model_types,
            from_hf_config="loongforge_llm.provider:model_cfg_from_hf_config",
            config_groups=tuple(f"models/{g}" for g in f.config_groups),
            supported=f.supported,
            description=f.description,
        )
        for f in FAMILIES.values()
    ]


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_llm.configs", provider="llm")]


@hookimpl
def loongforge_on_train_start(trainer):
    from loongforge_llm.moe.metrics import on_train_start

    on_train_start(trainer)


@hookimpl
def loongforge_on_step_end(trainer, step, metrics):
    from loongforge_llm.moe.metrics import on_step_end

    on_step_end(trainer, step, metrics)
