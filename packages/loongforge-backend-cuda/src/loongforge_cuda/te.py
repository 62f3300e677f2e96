"""Transformer Engine as an optional layer spec (``precision.layer_spec=te``; extra ``te``).

megatron-core ships the spec (``get_gpt_layer_with_transformer_engine_spec``); this module only
checks that ``transformer_engine`` imports and builds it. We never build TE ourselves: install it
as a wheel (``pip install 'loongforge-backend-cuda[te]'``) where one exists for the machine.
"""

from __future__ import annotations

import importlib.util

from loongforge.config import ConfigError

SPECS = ("local", "te")


def te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def check_layer_spec(choice: str | None) -> str:
    """``choice`` validated: ``local`` or ``te`` (which needs transformer_engine importable)."""
    choice = choice or "local"
    if choice not in SPECS:
        raise ConfigError(f"config key 'precision.layer_spec': {choice!r} is not one of {', '.join(SPECS)}")
    if choice == "te" and not te_installed():
        raise ConfigError("config key 'precision.layer_spec': 'te' needs Transformer Engine, which does not import "
                          "here (pip install 'loongforge-backend-cuda[te]' where a wheel exists for this machine)")
    return choice


def te_layer_spec(config):
    """megatron-core's Transformer Engine GPT layer spec for ``config`` (QK-norm as configured)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=bool(getattr(config, "qk_layernorm", False)))
