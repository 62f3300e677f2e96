"""Entry point of ``loongforge-diffusion``: registers the Wan DiT's configs, converters and tasks.

Importing this module imports no torch (discovery imports every plugin).
"""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import CheckpointConverter, ConfigDir

LOONGFORGE_API_VERSION = "1.0"


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
