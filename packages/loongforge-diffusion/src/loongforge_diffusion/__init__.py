"""Diffusion transformer (DiT) models for LoongForge."""

__version__ = "0.1.0"
