"""Xiaomi MiMo-7B (HF ``model_type: mimo``, remote code ``MiMoForCausalLM``) - EXPERIMENTAL.

The main model has the Qwen2 layout (q/k/v biases, GQA); the checkpoint also holds
``num_nextn_predict_layers`` multi-token-prediction layers (``model.mtp_layers.*``), which are not
built or loaded here. transformers ships no ``mimo`` class (only the unrelated MoE
``mimo_v2_flash``), so there is no HF reference: parity is not tested and the family is not listed
as supported.
"""

from loongforge_llm.mimo.family import FAMILY

__all__ = ["FAMILY"]
