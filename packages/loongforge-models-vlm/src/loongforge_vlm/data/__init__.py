"""Multimodal conversation data: image preprocessing, placeholder expansion, positions, batches."""
