"""Vision-language models assembled from encoder x projector x LLM for LoongForge."""

__version__ = "0.1.0"
