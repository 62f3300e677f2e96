"""NVIDIA CUDA backend for LoongForge: NCCL, CUDA RNG, memory stats, fast attention."""

__version__ = "0.1.0"
