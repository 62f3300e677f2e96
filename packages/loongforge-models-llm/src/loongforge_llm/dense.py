"""Reuse the dense decoder provider for a family of your own (the public API for plugins).

A dense decoder that differs from LLaMA/Qwen only in config defaults and HF tensor names needs no
provider of its own: describe it with a :class:`DenseFamily` (what ``model.family`` is called, the
HF ``model_type`` it loads, q/k/v biases, QK-norm, its weight rules as ``"module:function"``
returning ``loongforge.weight_mapping`` rules, e.g. built from
``loongforge_llm.common.weights.dense_rules``), bind the provider to it with
:func:`dense_provider`, and register :func:`dense_family_record`::

    FAMILY = DenseFamily(name="mine", hf_model_types=("mine",), hf_model_type="mine",
                         hf_architecture="MineForCausalLM", config_groups=("mine",),
                         rules="my_plugin.mine:rules", qk_norm=True)
    Provider = dense_provider(FAMILY)

    @hookimpl
    def loongforge_register_models():
        return [dense_family_record(FAMILY, "my_plugin.mine:Provider")]

``tests/plugins/example_plugin`` (``loongforge_example.dense``) is a complete one, with a parity
test against HF. No torch import.
"""

from __future__ import annotations

from loongforge.registry import ModelFamily

from loongforge_llm.common.family import FamilySpec as DenseFamily
from loongforge_llm.provider import LLMProvider

__all__ = ["DenseFamily", "dense_family_record", "dense_provider"]


def dense_provider(family: DenseFamily) -> type[LLMProvider]:
    """The dense provider class bound to ``family`` (register it by its import path)."""
    return type(f"{family.name.title().replace('_', '')}Provider", (LLMProvider,),
                {"family_spec": family, "__doc__": f"``LLMProvider`` for the {family.name!r} family."})


def dense_family_record(family: DenseFamily, provider: str) -> ModelFamily:
    """The registry record of ``family``; ``provider``: the import path of its
    :func:`dense_provider` class (``"my_plugin.mine:Provider"``)."""
    return ModelFamily(
        name=family.name,
        builder=provider,
        hf_model_types=family.hf_model_types,
        from_hf_config=f"{provider}.from_hf_config",
        config_groups=tuple(f"models/{g}" for g in family.config_groups),
        supported=family.supported and family.hf_reference is not None,
        description=family.description,
    )
