"""HuggingFace <-> megatron-core checkpoint conversion for LoongForge."""

__version__ = "0.1.0"
