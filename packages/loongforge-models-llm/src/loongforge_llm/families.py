"""The families this package provides, by ``model.family`` (no torch import)."""

from __future__ import annotations

from loongforge_llm.common.args import ModelConfigError
from loongforge_llm.common.family import FamilySpec
from loongforge_llm.llama import FAMILY as LLAMA
from loongforge_llm.mimo import FAMILY as MIMO
from loongforge_llm.qwen2 import FAMILY as QWEN2
from loongforge_llm.qwen3 import FAMILY as QWEN3
from loongforge_llm.qwen3_moe import FAMILY as QWEN3_MOE

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (LLAMA, QWEN2, QWEN3, MIMO, QWEN3_MOE)}


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise ModelConfigError(f"config key 'model.family': unknown family {name!r} (this package has: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_for_model_type(model_type: str) -> FamilySpec:
    for f in FAMILIES.values():
        if model_type in f.hf_model_types:
            return f
    raise ModelConfigError(f"HF model_type {model_type!r} belongs to no family of this package ({', '.join(FAMILIES)})")
