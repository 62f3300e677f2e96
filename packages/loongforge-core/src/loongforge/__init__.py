"""LoongForge core: plugin system, config composition, CLI, trainer and data pipelines.

Plugins import this package; it never imports a plugin.
"""

from importlib.metadata import version as _version

import pluggy

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("loongforge-core")

#: Version of the hook API plugins are written against. A plugin declares the value it was
#: built for as ``LOONGFORGE_API_VERSION`` in its plugin module; a different major is refused.
#: 1.1: the task contract (``loongforge.task.TrainTask``, ``Task.task``/``generate``) and
#: ``loongforge_register_config_sections``.
API_VERSION = "1.1"

hookimpl = pluggy.HookimplMarker("loongforge")

__all__ = ["API_VERSION", "__version__", "hookimpl"]
