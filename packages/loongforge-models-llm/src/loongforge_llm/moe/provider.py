"""``MoEProvider``: an MoE decoder family as megatron-core ``GPTModel`` with ``MoELayer`` MLPs.

Everything dense (attention, norms, embeddings, RoPE, vocabulary padding) is
:class:`~loongforge_llm.provider.LLMProvider`'s; this class adds the MoE ``TransformerConfig``
fields, swaps the MLP of the MoE layers in the backend's layer spec and adds the router/expert
weight rules for this rank's experts (``parallel.ep``/``parallel.etp``).

Routing of Qwen3-MoE in megatron-core's terms: HF takes softmax over all experts, the top-k,
and (``norm_topk_prob``) renormalises them. With ``moe_router_pre_softmax=False`` megatron takes
the top-k logits and a softmax over those k, which is the same renormalised distribution; with
``norm_topk_prob=false`` it is ``moe_router_pre_softmax=True`` (softmax first, no renormalising).
"""

from __future__ import annotations

from typing import Any

from loongforge.model_provider import RunSettings
from loongforge.registry import load_object

from loongforge_llm.common.args import ModelConfigError
from loongforge_llm.moe.args import MoEArgs
from loongforge_llm.provider import LLMProvider


class MoEProvider(LLMProvider):
    """``ModelProvider`` of the MoE families (``FamilySpec.moe``); ``self.moe``: the parsed MoE fields."""

    def __init__(self, model_cfg: Any, *, plugins: Any = None):
        super().__init__(model_cfg, plugins=plugins)
        parse = load_object(self.family.moe_args)
        self.moe: MoEArgs = parse(self._section, self.args)

    def __repr__(self) -> str:
        m = self.moe
        return f"MoEProvider({self.args.family}: {self.args.num_hidden_layers} layers, {m.num_experts} experts, top-{m.top_k})"

    # --- megatron-core -------------------------------------------------------------------------
    def extra_config_fields(self, run: RunSettings) -> dict[str, Any]:
        m, o = self.moe, self.moe.options
        ep, etp = getattr(run, "ep", 1), getattr(run, "etp", None) or 1
        if m.num_experts % ep:
            raise ModelConfigError(f"config key 'parallel.ep' ({ep}) must divide 'model.num_experts' ({m.num_experts})")
        if m.moe_intermediate_size % etp:
            raise ModelConfigError(f"config key 'parallel.etp' ({etp}) must divide 'model.moe_intermediate_size' "
                                   f"({m.moe_intermediate_size})")
        fields: dict[str, Any] = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.top_k,
            moe_ffn_hidden_size=m.moe_intermediate_size,
            moe_layer_freq=[int(x) for x in m.moe_layers],
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not m.norm_topk_prob,
            moe_router_dtype=o.router_dtype,
            moe_router_load_balancing_type=o.aux_loss_type,
            moe_aux_loss_coeff=m.aux_loss_coeff,
            moe_z_loss_coeff=o.z_loss_coeff,
            moe_token_dispatcher_type=o.token_dispatcher,
            moe_expert_capacity_factor=o.capacity_factor,
            moe_pad_expert_input_to_capacity=o.pad_to_capacity,
            moe_token_drop_policy=o.drop_policy,
            moe_grouped_gemm=False,  # megatron's own grouped GEMM needs Transformer Engine; ours is the spec's
            moe_permute_fusion=False,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )
        fields.update(self.family.moe_config_fields(self._section, self.moe))
        return fields

    def layer_spec(self, config, backend: Any, vp_stage: int | None = None) -> Any:
        from loongforge_llm.moe.spec import moe_decoder_spec

        dense = super().layer_spec(config, backend, vp_stage=vp_stage)
        mlp = load_object(self.family.moe_mlp)(config, self.moe)
        return moe_decoder_spec(dense, config, self.moe.moe_layers, mlp, vp_stage=vp_stage)

    # --- weights -------------------------------------------------------------------------------
    def weight_mapping(self, run: RunSettings | None = None, *, ep_rank: int = 0, ep_size: int = 1,
                       etp_rank: int = 0, etp_size: int = 1):
        """HF <-> ours mapping; the expert rules cover the experts of EP rank ``ep_rank`` of
        ``ep_size`` (default: all) and the rows/columns of ETP rank ``etp_rank``."""
        from loongforge.weight_mapping import WeightMapping

        rules = load_object(self.family.rules)(self.args, self.moe, self.padded_vocab_size(run), ep_rank=ep_rank,
                                               ep_size=ep_size, etp_rank=etp_rank, etp_size=etp_size)
        return WeightMapping(rules, self.args.num_hidden_layers, ignore_hf=self.family.ignore_hf)

    def load_hf_weights(self, model, get_hf_tensor, *, tp_rank=None, tp_size=None, run=None,
                        ep_rank: int | None = None, ep_size: int | None = None,
                        etp_rank: int | None = None, etp_size: int | None = None) -> None:
        """:meth:`LLMProvider.load_hf_weights` reading only this rank's experts (EP/ETP ranks
        from megatron's parallel state unless given); HF per-expert or fused expert tensors."""
        from loongforge_llm.moe.weights import per_expert_getter

        if ep_size is None or ep_rank is None or etp_size is None or etp_rank is None:
            from megatron.core import parallel_state

            ep_size = parallel_state.get_expert_model_parallel_world_size()
            ep_rank = parallel_state.get_expert_model_parallel_rank()
            etp_size = parallel_state.get_expert_tensor_parallel_world_size()
            etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        mapping = self.weight_mapping(run, ep_rank=ep_rank, ep_size=ep_size, etp_rank=etp_rank, etp_size=etp_size)
        super().load_hf_weights(model, per_expert_getter(get_hf_tensor), tp_rank=tp_rank, tp_size=tp_size, run=run,
                                mapping=mapping)

    def num_parameters(self, *, padded: RunSettings | None = None, active: bool = False) -> int:
        """Parameter count of the HF model; ``active``: those one token uses (top-k experts)."""
        from loongforge_llm.moe.args import moe_num_parameters

        vocab = self.padded_vocab_size(padded) if padded is not None else None
        return moe_num_parameters(self.args, self.moe, qk_norm=self.qk_norm, vocab_size=vocab, active=active,
                                  extra=self.family.moe_extra_params(self.args, self.moe))

    def flops_per_token(self, seq_length: int) -> float:
        """Model FLOPs (forward + backward) per token for MFU, on ACTIVE parameters:
        6 x N_active + 6 x layers x heads x head_dim x S, N_active = the matrix-product parameters a
        token goes through (attention, router, its top-k and shared experts, the output layer; not
        the input embedding lookup)."""
        a = self.args
        n_active = self.num_parameters(active=True) - a.vocab_size * a.hidden_size
        if a.tie_word_embeddings:
            n_active += a.vocab_size * a.hidden_size  # the (tied) output layer is a matrix product
        return 6 * n_active + 6 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * seq_length

    def hf_config(self) -> dict[str, Any]:
        cfg = super().hf_config()
        cfg.update(self.family.moe_hf_config(self._section, self.moe))
        return cfg
