"""The MoE part of the ``model`` section: HF ``config.json`` fields plus our ``model.moe`` options.

HF fields read (Qwen3-MoE names; no torch import here):

* ``num_experts``, ``num_experts_per_tok`` (top-k), ``moe_intermediate_size`` (each expert's FFN),
  ``norm_topk_prob`` (renormalise the top-k probabilities), ``router_aux_loss_coef``;
* which layers are MoE: layer ``i`` is MoE unless ``i`` is in ``mlp_only_layers`` or
  ``(i + 1) % decoder_sparse_step != 0`` (the others are dense MLPs of ``intermediate_size``).

``model.moe`` (all optional; an unknown key fails naming it):

=============================  ===========  ===========================================================
key                            default      meaning
=============================  ===========  ===========================================================
``grouped_gemm``               ``true``     experts as :class:`~loongforge_llm.moe.experts.GroupedExperts`
                                            (``false``: megatron-core's ``SequentialMLP``, one module per
                                            expert; the reference)
``token_dispatcher``           ``alltoall`` megatron-core's dispatcher: ``alltoall`` or ``allgather``
``aux_loss_type``              ``aux_loss`` ``aux_loss`` (per micro-batch), ``seq_aux_loss``,
                                            ``global_aux_loss`` or ``none``
``aux_loss_coeff``             HF           load-balancing loss weight (default: ``router_aux_loss_coef``)
``z_loss_coeff``               ``null``     router z-loss weight (ST-MoE); ``null``: off
``capacity_factor``            ``null``     ``null``: dropless; a number: each expert takes at most
                                            ``capacity_factor x tokens x top-k / experts`` tokens
``drop_policy``                ``probs``    with a capacity: drop the lowest-probability (``probs``) or
                                            the latest (``position``) tokens
``pad_to_capacity``            ``false``    with a capacity: pad every expert's input to the capacity
``router_dtype``               ``fp32``     the router's softmax/top-k precision (``fp32``/``fp64``)
=============================  ===========  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from loongforge_llm.common.args import ModelConfigError

#: HF keys that make a model section a mixture of experts
MOE_HF_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class MoEOptions:
    grouped_gemm: bool = True
    token_dispatcher: str = "alltoall"
    aux_loss_type: str = "aux_loss"
    aux_loss_coeff: float | None = None
    z_loss_coeff: float | None = None
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    router_dtype: str = "fp32"


_CHOICES = {
    "token_dispatcher": ("alltoall", "allgather"),
    "aux_loss_type": ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"),
    "drop_policy": ("probs", "position"),
    "router_dtype": ("fp32", "fp64"),
}


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    router_aux_loss_coef: float
    #: one bool per decoder layer: True where the layer's MLP is the MoE block
    moe_layers: tuple[bool, ...]
    options: MoEOptions

    @property
    def aux_loss_coeff(self) -> float:
        o = self.options
        if o.aux_loss_type == "none":
            return 0.0
        return self.router_aux_loss_coef if o.aux_loss_coeff is None else o.aux_loss_coeff


def has_moe_keys(section: dict[str, Any]) -> list[str]:
    """The MoE keys present in a ``model`` section (an MoE config given to a dense family)."""
    found = [k for k in MOE_HF_KEYS if section.get(k)]
    if section.get("moe") is not None:
        found.append("moe")
    return found


def _positive_int(d: dict, key: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelConfigError(f"config key 'model.{key}' must be a positive integer, got {v!r}")
    return v


def parse_options(raw: Any) -> MoEOptions:
    raw = dict(raw or {})
    known = {f.name for f in fields(MoEOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ModelConfigError(f"unknown config key 'model.moe.{unknown[0]}' (valid keys under model.moe: "
                               f"{', '.join(sorted(known))})")
    for key, choices in _CHOICES.items():
        if key in raw and raw[key] not in choices:
            raise ModelConfigError(f"config key 'model.moe.{key}' must be one of {', '.join(choices)}, got {raw[key]!r}")
    cf = raw.get("capacity_factor")
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int | float) or cf <= 0):
        raise ModelConfigError(f"config key 'model.moe.capacity_factor' must be a positive number or null, got {cf!r}")
    if raw.get("pad_to_capacity") and cf is None:
        raise ModelConfigError("config key 'model.moe.pad_to_capacity' needs 'model.moe.capacity_factor'")
    return MoEOptions(**raw)


def moe_layer_pattern(num_layers: int, decoder_sparse_step: int, mlp_only_layers) -> tuple[bool, ...]:
    """HF Qwen-MoE's rule: layer i is MoE unless in ``mlp_only_layers`` or ``(i+1) % step != 0``."""
    dense = set(mlp_only_layers or ())
    bad = sorted(i for i in dense if not (isinstance(i, int) and 0 <= i < num_layers))
    if bad:
        raise ModelConfigError(f"config key 'model.mlp_only_layers': {bad} are not layer indices 0..{num_layers - 1}")
    return tuple(i not in dense and (i + 1) % decoder_sparse_step == 0 for i in range(num_layers))


def parse_moe_args(section: dict[str, Any], num_layers: int) -> MoEArgs:
    """The MoE fields of a Qwen-MoE style section (transformers 5 writes ``num_experts`` as
    ``num_local_experts`` in config.json; either is read)."""
    if section.get("num_experts") is None and section.get("num_local_experts") is not None:
        section = {**section, "num_experts": section["num_local_experts"]}
    experts = _positive_int(section, "num_experts")
    top_k = _positive_int(section, "num_experts_per_tok")
    if top_k > experts:
        raise ModelConfigError(f"config key 'model.num_experts_per_tok' ({top_k}) exceeds 'model.num_experts' ({experts})")
    norm = bool(section.get("norm_topk_prob", False))
    if top_k == 1 and norm:
        raise ModelConfigError("config keys 'model.num_experts_per_tok'=1 with 'model.norm_topk_prob'=true: "
                               "megatron-core's router takes the softmax before a top-1 choice (weight p, not 1)")
    step = section.get("decoder_sparse_step", 1) or 1
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ModelConfigError(f"config key 'model.decoder_sparse_step' must be a positive integer, got {step!r}")
    pattern = moe_layer_pattern(num_layers, step, section.get("mlp_only_layers"))
    if not any(pattern):
        raise ModelConfigError("config keys 'model.decoder_sparse_step'/'model.mlp_only_layers' leave no MoE layer")
    return MoEArgs(
        num_experts=experts,
        top_k=top_k,
        moe_intermediate_size=_positive_int(section, "moe_intermediate_size"),
        norm_topk_prob=norm,
        router_aux_loss_coef=float(section.get("router_aux_loss_coef", 0.001) or 0.0),
        moe_layers=pattern,
        options=parse_options(section.get("moe")),
    )


def moe_num_parameters(args, moe: MoEArgs, *, qk_norm: bool, vocab_size: int | None = None, active: bool = False,
                       extra: int = 0) -> int:
    """Parameter count of an MoE decoder with GQA attention (embedding counted once when tied);
    ``active``: with only the top-k routed experts of each MoE layer; ``extra``: family
    parameters per MoE layer beyond router + routed experts (e.g. shared experts)."""
    h, hd = args.hidden_size, args.head_dim
    q, kv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    attn = h * (q + 2 * kv) + q * h + (2 * hd if qk_norm else 0)
    dense_mlp = 3 * h * args.intermediate_size
    experts = moe.top_k if active else moe.num_experts
    moe_mlp = moe.num_experts * h + experts * 3 * h * moe.moe_intermediate_size + extra
    layers = sum(attn + 2 * h + (moe_mlp if is_moe else dense_mlp) for is_moe in moe.moe_layers)
    v = args.vocab_size if vocab_size is None else vocab_size
    return layers + h + v * h * (1 if args.tie_word_embeddings else 2)
