"""Embodied vision-language-action (VLA) models for LoongForge."""

from importlib.metadata import version as _version

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("loongforge-embodied")
