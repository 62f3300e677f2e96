"""Hydra configs of loongforge-models-llm (searched as ``pkg://loongforge_llm.configs``)."""
