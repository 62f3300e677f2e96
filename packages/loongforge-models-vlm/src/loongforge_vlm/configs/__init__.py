"""Hydra configs of loongforge-models-vlm (searched as ``pkg://loongforge_vlm.configs``)."""
