"""Embodied vision-language-action (VLA) models for LoongForge."""

__version__ = "0.1.0"
