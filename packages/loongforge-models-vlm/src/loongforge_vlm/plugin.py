"""Entry point of ``loongforge-models-vlm`` (entry point ``vlm``).

Contributes the ``models/image_encoder`` / ``models/image_projector`` Hydra groups. Importing this
module imports no torch or megatron-core.
"""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import ConfigDir

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_vlm.configs", provider="vlm")]
