"""Qwen3 dense models (HF ``model_type: qwen3``): no biases, RMSNorm on each query/key head
(``qk_layernorm``), ``head_dim`` independent of ``hidden_size / num_attention_heads``.
Sizes: ``models/qwen3/*``."""

from loongforge_llm.qwen3.family import FAMILY

__all__ = ["FAMILY"]
