"""Registered vision components (``image_encoder`` / ``image_projector`` kinds), one module each."""
