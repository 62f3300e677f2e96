"""LLaMA 2 and LLaMA 3 / 3.1 / 3.2 (HF ``model_type: llama``): GQA, SwiGLU, RMSNorm, RoPE with
optional ``llama3`` frequency scaling, no biases. Sizes: ``models/llama2/*``, ``models/llama3/*``."""

from loongforge_llm.llama.family import FAMILY

__all__ = ["FAMILY"]
