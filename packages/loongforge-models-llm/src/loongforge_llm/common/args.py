"""The ``model`` config section of a dense decoder, read with HuggingFace ``config.json`` names.

``parse_model_args`` turns the section (a dict or an OmegaConf node, e.g. a composed
``models/qwen3/qwen3_0.6b.yaml`` or an HF ``config.json`` read by ``model.pretrained``) into a
validated :class:`DenseArgs`. Keys other than the ones below are allowed and ignored (HF configs
carry many), so a ``config.json`` can be used as is. No torch import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loongforge.config import ConfigError

#: the RoPE scaling types this package reproduces exactly, with the keys each one reads
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
SUPPORTED_ROPE_TYPES = tuple(ROPE_KEYS)


class ModelConfigError(ConfigError):
    """A ``model`` config value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class DenseArgs:
    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    #: ``None`` or an HF ``rope_scaling`` dict with ``rope_type`` set
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    hidden_act: str
    initializer_range: float
    attention_dropout: float
    #: anything else from the section that an HF config.json export keeps (token ids, ...)
    extra: dict[str, Any]


_REQUIRED = (
    "family",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)

#: keys copied verbatim into an exported config.json when present
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "num_nextn_predict_layers")


def to_plain_dict(section: Any) -> dict[str, Any]:
    """A plain ``dict`` from a mapping or an OmegaConf ``DictConfig`` (interpolations resolved)."""
    if isinstance(section, Mapping) and not hasattr(section, "_metadata"):
        return dict(section)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]


def _int(d: dict, key: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        raise ModelConfigError(f"config key 'model.{key}' must be an integer, got {v!r}")
    if int(v) <= 0:
        raise ModelConfigError(f"config key 'model.{key}' must be positive, got {v!r}")
    return int(v)


def _rope(d: dict) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from legacy ``rope_theta``/``rope_scaling`` or transformers v5's
    ``rope_parameters``."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(params, Mapping):
        params = dict(params)
        theta = params.pop("rope_theta", theta)
        if scaling is None:
            scaling = params
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("rope_theta", None)
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **scaling}
    if scaling is not None:
        rope_type = scaling["rope_type"]
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"config key 'model.rope_scaling.rope_type': {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        unknown = sorted(set(scaling) - {"rope_type", *ROPE_KEYS[rope_type]})
        if unknown:  # e.g. partial_rotary_factor, attention_factor, mrope_section: not implemented
            raise ModelConfigError(f"config key 'model.rope_scaling.{unknown[0]}' is not supported for rope_type "
                                   f"{rope_type!r} (it reads: {', '.join(ROPE_KEYS[rope_type]) or 'nothing'})")
        need = ROPE_KEYS[rope_type][:3]
        for k in need:
            if k not in scaling:
                raise ModelConfigError(f"config key 'model.rope_scaling.{k}' is required for rope_type {rope_type!r}")
        if rope_type == "llama3":
            scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    return float(theta), scaling


def parse_model_args(section: Any) -> DenseArgs:
    d = to_plain_dict(section)
    missing = [k for k in _REQUIRED if d.get(k) is None]
    if missing:
        raise ModelConfigError(
            "config keys missing from the 'model' section: "
            + ", ".join(f"'model.{k}'" for k in missing)
            + " (pick a size, e.g. 'defaults: [{/models/qwen3@model: qwen3_0.6b}]')"
        )
    hidden = _int(d, "hidden_size")
    heads = _int(d, "num_attention_heads")
    kv_heads = _int(d, "num_key_value_heads") if d.get("num_key_value_heads") is not None else heads
    if heads % kv_heads:
        raise ModelConfigError(
            f"config key 'model.num_key_value_heads' ({kv_heads}) must divide 'model.num_attention_heads' ({heads})"
        )
    if d.get("head_dim") is not None:
        head_dim = _int(d, "head_dim")
    else:
        if hidden % heads:
            raise ModelConfigError(
                f"config key 'model.head_dim' is required: 'model.hidden_size' ({hidden}) is not a multiple "
                f"of 'model.num_attention_heads' ({heads})"
            )
        head_dim = hidden // heads
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"config key 'model.hidden_act': only 'silu' (SwiGLU) is supported, got {act!r}")
    if d.get("mlp_bias"):
        raise ModelConfigError("config key 'model.mlp_bias': MLP biases are not supported")
    theta, scaling = _rope(d)
    max_pos = d.get("max_position_embeddings")
    return DenseArgs(
        family=str(d["family"]),
        hidden_size=hidden,
        intermediate_size=_int(d, "intermediate_size"),
        num_hidden_layers=_int(d, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_int(d, "vocab_size"),
        max_position_embeddings=_int(d, "max_position_embeddings") if max_pos is not None else 4096,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        hidden_act=act,
        initializer_range=float(d.get("initializer_range", 0.02)),
        attention_dropout=float(d.get("attention_dropout", 0.0) or 0.0),
        extra={k: d[k] for k in PASSTHROUGH_KEYS if d.get(k) is not None},
    )


def num_parameters(args: DenseArgs, *, qkv_bias: bool, qk_norm: bool, vocab_size: int | None = None) -> int:
    """Parameter count of the HF model (embedding counted once when tied); ``vocab_size``
    overrides ``args.vocab_size`` (e.g. the padded one)."""
    h, ffn, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if qkv_bias else 0) + (2 * hd if qk_norm else 0)
    per_layer = attn + 3 * h * ffn + 2 * h
    v = args.vocab_size if vocab_size is None else vocab_size
    return args.num_hidden_layers * per_layer + h + v * h * (1 if args.tie_word_embeddings else 2)
