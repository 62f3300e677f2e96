from loongforge_llm.qwen3_moe.family import FAMILY

__all__ = ["FAMILY"]
