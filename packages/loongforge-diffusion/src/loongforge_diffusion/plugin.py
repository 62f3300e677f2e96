"""Entry point of ``loongforge-diffusion``: the ``wan_pretrain`` task, its ``diffusion`` config section,
the Wan size configs and the diffusers <-> ours converters.

Importing this module imports no torch (discovery imports every plugin).
"""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import CheckpointConverter, ConfigDir, ConfigSection, Task

LOONGFORGE_API_VERSION = "1.1"


@hookimpl
def loongforge_register_tasks():
    return [Task(name="wan_pretrain", task="loongforge_diffusion.task:WanTask",
                 generate="loongforge_diffusion.generate:generate",
                 description="flow-matching training of a Wan DiT on video latents (writes a sample video)"),
            Task(name="wan_preprocess", run="loongforge_diffusion.task:run_preprocess",
                 description="video manifests -> VAE latents + text embeddings (safetensors shards), no training")]


@hookimpl
def loongforge_register_config_sections():
    return [ConfigSection(name="diffusion", schema="loongforge_diffusion.schema:DiffusionConfig",
                          description="Wan data, preprocessing, flow matching, packing, sampling")]


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_diffusion.configs", provider="diffusion")]


@hookimpl
def loongforge_register_checkpoint_converters():
    return [
        CheckpointConverter(name="wan-diffusers-to-ours", run="loongforge_diffusion.convert:diffusers_to_ours",
                            description="diffusers WanTransformer3DModel folder -> our Wan DiT folder"),
        CheckpointConverter(name="wan-ours-to-diffusers", run="loongforge_diffusion.convert:ours_to_diffusers",
                            description="our Wan DiT folder -> diffusers WanTransformer3DModel folder"),
    ]
