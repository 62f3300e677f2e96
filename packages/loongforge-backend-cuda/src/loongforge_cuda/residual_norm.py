"""Each residual add of a transformer layer fused with the RMSNorm that follows it.

In megatron-core's layer the attention output is added to the residual stream (one kernel: read
two, write one), the sum is normalised before the MLP (another: read one, write one) and, in
backward, autograd adds the residual path's gradient to the norm's input gradient (a third).
:func:`fused_residual_norm_layer` builds a ``TransformerLayer`` subclass that, in the plain
training/eval case, runs ``add_rmsnorm(attn_out, residual, weight, eps) -> (normed, sum)`` there
instead: one kernel each way. The MLP residual add at the end of the layer is fused the same way
with the norm that reads its sum next (the next layer's input norm, or the block's final norm),
once :func:`link_residual_norms` has told each layer which norm that is; the layer hands the
result to that norm (``FusedRMSNorm.handoff``). Parameters and their names are megatron's, so
checkpoints and weight mappings do not change.

Everything else takes megatron's own forward: inference, cross-attention, MoE, recomputed or
offloaded norms and MLPs, chunked MLPs, fp32 residuals, hidden dropout while training, attention
output biases and norms that are not the fused RMSNorm.
"""

from __future__ import annotations


def fused_residual_norm_layer(add_rmsnorm) -> type:
    """megatron's ``TransformerLayer`` with the attention residual add + pre-MLP RMSNorm through
    ``add_rmsnorm``."""
    from megatron.core.inference.utils import InferenceMode
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.utils import make_viewless_tensor

    from loongforge_cuda.modules import FusedRMSNorm

    class FusedResidualNormLayer(TransformerLayer):
        def _fusable(self, kwargs) -> bool:
            c = self.config
            return (
                isinstance(self.pre_mlp_layernorm, FusedRMSNorm)
                and isinstance(self.cross_attention, IdentityOp)
                and isinstance(self.pre_cross_attn_layernorm, IdentityOp)
                and not self.is_moe_layer
                and not (self.recompute_input_layernorm or self.recompute_pre_mlp_layernorm or self.recompute_mlp)
                and not (self.offload_attn_norm or self.offload_mlp_norm)
                and not c.fp32_residual_connection and c.mlp_chunks_for_training <= 1
                and not (self.training and self.hidden_dropout > 0)
                and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None
                and kwargs.get("context") is None and not InferenceMode.is_active()
            )

        def forward(self, hidden_states=None, **kwargs):
            if not self._fusable(kwargs):
                return super().forward(hidden_states=hidden_states, **kwargs)
            attention_kwargs = {k: kwargs.get(k) for k in (
                "attention_mask", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin",
                "attention_bias", "packed_seq_params", "sequence_len_offset")}
            attn_out, attn_bias = self.self_attention(self.input_layernorm(hidden_states), **attention_kwargs)
            if attn_bias is not None:
                attn_out = attn_out + attn_bias
            norm = self.pre_mlp_layernorm
            normed, hidden_states = add_rmsnorm(attn_out, hidden_states, norm.weight, norm.eps)
            mlp_out, mlp_bias = self.mlp(normed, padding_mask=kwargs.get("padding_mask"))
            next_norm = self.__dict__.get("next_norm")
            if next_norm is not None and mlp_bias is None:
                next_normed, output = add_rmsnorm(mlp_out, hidden_states, next_norm.weight, next_norm.eps)
            else:
                next_normed = None
                with self.bias_dropout_add_exec_handler():
                    output = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                        (mlp_out, mlp_bias), hidden_states, self.hidden_dropout)
            output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
            if next_normed is not None:
                next_norm.hand_over(output, next_normed)
            return output, kwargs.get("context")

    return FusedResidualNormLayer


def link_residual_norms(modules: list) -> None:
    """Tell every fused layer in ``modules``' transformer blocks which ``FusedRMSNorm`` reads its
    output next (the next layer's input norm or the block's final norm), so that its MLP residual
    add runs fused with that norm. Stored outside the module tree: state dicts do not change."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from loongforge_cuda.modules import FusedRMSNorm

    for block in (m for module in modules for m in module.modules() if isinstance(m, TransformerBlock)):
        layers = list(block.layers)
        following = [layer.input_layernorm for layer in layers[1:]] + [block.final_layernorm]
        for layer, norm in zip(layers, following, strict=True):
            if hasattr(layer, "_fusable"):
                layer.__dict__["next_norm"] = norm if isinstance(norm, FusedRMSNorm) else None
