"""NVIDIA CUDA backend for LoongForge: NCCL, CUDA RNG, memory stats, fast attention."""

from importlib.metadata import version as _version

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("loongforge-backend-cuda")
