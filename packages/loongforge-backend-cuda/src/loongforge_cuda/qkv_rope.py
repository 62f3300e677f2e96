"""q/k RoPE (and Qwen3's QK-norm before it) straight from megatron's fused QKV projection.

megatron-core's ``SelfAttention.get_query_key_value_tensors`` splits the fused QKV output, copies
the query heads into a contiguous tensor (a reshape across KV groups), normalises q and k when the
layer has ``q_layernorm``/``k_layernorm``, and ``forward`` applies RoPE to each; in backward the
three gradients are concatenated back. :func:`qkv_rope_attention` builds a subclass that, for the
calls the kernel covers, runs ``qkv_rope(mixed, q_per_group, cos, sin, q_norm_weight,
k_norm_weight, eps)`` on the fused output instead (one call per layer: q and k read in place, v a
view, the fused-QKV gradient written directly) and the rest of megatron's forward without RoPE.
The norms stay the same modules with the same ``weight`` parameters, so checkpoints and weight
mappings do not change.

Every other call takes megatron's own path: inference, packed THD sequences, context parallelism,
fewer KV groups than tensor-parallel ranks, gated attention output, interleaved/MLA/Transformer
Engine RoPE, YaRN's mscale, layers without RoPE, and QK-norms that are not RMSNorm.
"""

from __future__ import annotations

import torch


def _head_rms_norm(module) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` of a q/k norm the kernel can stand in for (RMSNorm with a weight, no bias)."""
    from loongforge_cuda.modules import FusedRMSNorm

    if not isinstance(module, (FusedRMSNorm, torch.nn.RMSNorm)):
        return None
    weight, eps = getattr(module, "weight", None), getattr(module, "eps", None)
    return None if weight is None or eps is None else (weight, float(eps))


def qkv_rope_attention(qkv_rope) -> type:
    """megatron's ``SelfAttention`` with q/k (norm and) RoPE through ``qkv_rope``."""
    from megatron.core.inference.utils import InferenceMode
    from megatron.core.transformer.attention import SelfAttention

    from loongforge_cuda.modules import rope_tables

    class QKVRoPESelfAttention(SelfAttention):
        #: the RoPE angles ``[s, 1 or b, 1, r]`` of the forward call in progress, when it is fused
        _fused_freqs = None

        def _norms_fusable(self) -> bool:
            c = self.config
            if self.q_layernorm is None and self.k_layernorm is None:
                return not c.qk_layernorm
            q, k = _head_rms_norm(self.q_layernorm), _head_rms_norm(self.k_layernorm)
            return (c.qk_layernorm and not c.qk_l2_norm and c.normalization == "RMSNorm"
                    and q is not None and k is not None and q[1] == k[1])  # one eps for both

        def _fusable(self, rotary_pos_emb, batch: int, others) -> bool:
            c = self.config
            no_rope = bool(c.no_rope_freq) and bool(c.no_rope_freq[self.layer_number - 1])
            return (
                isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.dim() == 4
                and rotary_pos_emb.shape[1] in (1, batch) and rotary_pos_emb.shape[2] == 1
                and all(v is None for v in others) and not InferenceMode.is_active()
                and c.context_parallel_size == 1 and not no_rope and self._norms_fusable()
                and c.num_query_groups >= self.world_size and not c.attention_output_gate
                and not (c.apply_rope_fusion or c.rotary_interleaved or c.multi_latent_attention
                         or c.fused_single_qkv_rope or c.flash_decode or c.test_mode)
                and self._yarn_concentration_factor in (None, 1.0)
            )

        def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                    rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                    attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *,
                    inference_params=None):
            kwargs = dict(key_value_states=key_value_states, inference_context=inference_context,
                          rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                          rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                          packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                          inference_params=inference_params)
            others = (key_value_states, inference_context, inference_params, packed_seq_params,
                      rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin, sequence_len_offset)
            if not self._fusable(rotary_pos_emb, hidden_states.shape[1], others):
                return super().forward(hidden_states, attention_mask, rotary_pos_emb=rotary_pos_emb, **kwargs)
            # RoPE happens in get_query_key_value_tensors; megatron's forward must not apply it again
            self._fused_freqs = rotary_pos_emb
            try:
                return super().forward(hidden_states, attention_mask, rotary_pos_emb=None, **kwargs)
            finally:
                self._fused_freqs = None

        def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                        split_qkv=True):
            freqs = self._fused_freqs
            if freqs is None or not split_qkv or output_gate:
                return super().get_query_key_value_tensors(
                    hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv)
            mixed, _ = self.linear_qkv(hidden_states)  # [s, b, ng * (np/ng + 2) * hn]
            groups = self.num_query_groups_per_partition
            mixed = mixed.view(*mixed.shape[:2], groups, -1)
            cos, sin = rope_tables(freqs, mixed.dtype)
            norms = ()
            if self.q_layernorm is not None:
                (q_weight, eps), (k_weight, _) = _head_rms_norm(self.q_layernorm), _head_rms_norm(self.k_layernorm)
                norms = (q_weight, k_weight, eps)
            return qkv_rope(mixed, self.num_attention_heads_per_partition // groups, cos, sin, *norms)

    return QKVRoPESelfAttention
