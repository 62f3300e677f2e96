"""Intel XPU backend for LoongForge."""

__version__ = "0.1.0"
