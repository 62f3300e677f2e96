"""Qwen1.5, Qwen2 and Qwen2.5 (HF ``model_type: qwen2``): the LLaMA layout plus q/k/v biases.
Sizes: ``models/qwen1_5/*``, ``models/qwen2/*``, ``models/qwen2_5/*``."""

from loongforge_llm.qwen2.family import FAMILY

__all__ = ["FAMILY"]
