"""LoongForge core: plugin system, config composition, CLI, trainer and data pipelines.

Plugins import this package; it never imports a plugin.
"""

import pluggy

__version__ = "0.1.0"

#: Version of the hook API plugins are written against. A plugin declares the value it was
#: built for as ``LOONGFORGE_API_VERSION`` in its plugin module; a different major is refused.
#: 1.1: the task contract (``loongforge.task.TrainTask``, ``Task.task``/``generate``) and
#: ``loongforge_register_config_sections``.
API_VERSION = "1.1"

hookimpl = pluggy.HookimplMarker("loongforge")

__all__ = ["API_VERSION", "__version__", "hookimpl"]
