"""Torch RMSNorm/LayerNorm builders for the local spec that also work with sequence parallelism.

megatron-core's local spec normalises with ``WrappedTorchNorm`` when Apex is absent, and that
builder refuses ``sequence_parallel=True`` outright (megatron-core 0.19.2,
``transformer/torch_norm.py``). The reason is bookkeeping, not maths: under sequence parallelism
each tensor-parallel rank normalises only its slice of the sequence, so the norm weight's gradient
on one rank is a partial sum, and megatron-core's ``finalize_model_grads`` all-reduces it over the
tensor-parallel group only for parameters marked ``param.sequence_parallel = True`` (Apex's and
Transformer Engine's norms set that mark). :class:`LocalNorm` is ``torch.nn.RMSNorm``/
``LayerNorm`` with that mark, for norms over the hidden states (input, pre-MLP and final norms).

:class:`LocalHeadNorm` is the same norm for QK-norm (``q_layernorm``/``k_layernorm``). Those run
after the column-parallel QKV projection has gathered the whole sequence, over this rank's heads;
megatron-core already all-reduces their gradients over tensor-parallel ranks by name whenever
``qk_layernorm`` is on, so they carry no sequence-parallel mark.
"""

from __future__ import annotations

import torch

_NORMS = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}


def _build(config, hidden_size: int, eps: float) -> torch.nn.Module:
    if config.normalization not in _NORMS:
        raise ValueError(f"normalization {config.normalization!r}: the local spec has {', '.join(_NORMS)}")
    for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
        if getattr(config, flag, False):
            raise ValueError(f"TransformerConfig.{flag}=True is not supported by the local spec's torch norms")
    return _NORMS[config.normalization](hidden_size, eps=eps)


class LocalNorm:
    """Norm over hidden states ``[s(/tp), b, h]``; weights marked for sequence-parallel grad reduction."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_ignored) -> torch.nn.Module:
        norm = _build(config, hidden_size, eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


class LocalHeadNorm:
    """Norm over one attention head's features (QK-norm); never sequence-parallel."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_ignored) -> torch.nn.Module:
        return _build(config, hidden_size, eps)
