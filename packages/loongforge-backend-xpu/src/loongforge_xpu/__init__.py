"""Kunlun (Kunlunxin) XPU backend for LoongForge."""

from importlib.metadata import version as _version

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("loongforge-backend-xpu")
