"""Qwen3's QK-norm and RoPE in one kernel call for q and one for k.

megatron-core's ``SelfAttention`` normalises q and k inside ``get_query_key_value_tensors``
(``q_layernorm``/``k_layernorm``, after the tensor-parallel head selection) and applies RoPE later
in ``forward``. :func:`qk_norm_rope_attention` builds a subclass that, for the calls the kernel
covers, asks megatron for the un-normalised q and k, applies ``qk_norm_rope(x, weight, eps, cos,
sin)`` to each, and runs the rest of megatron's forward without RoPE. The norms stay the same
modules with the same ``weight`` parameters, so checkpoints and weight mappings do not change.

Every other call takes megatron's own path (the separate norm modules, then ``apply_rotary_pos_emb``,
which the backend's RoPE patch may fuse): inference, packed THD sequences (``packed_seq_params``),
context parallelism, interleaved/MLA/Transformer Engine RoPE, YaRN's mscale, layers without RoPE,
and norms that are not RMSNorm. Angles may be shared by the batch (``[s, 1, 1, d]``) or per sample
(``[s, b, 1, d]``: position ids that restart at each packed document).
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


def qk_norm_rope_attention(qk_norm_rope) -> type:
    """megatron's ``SelfAttention`` with q/k RMSNorm + RoPE through ``qk_norm_rope``."""
    from loongforge_cuda.modules import rope_tables
    from megatron.core.inference.utils import InferenceMode
    from megatron.core.transformer.attention import SelfAttention

    class QKNormRoPESelfAttention(SelfAttention):
        #: the RoPE angles ``[s, 1 or b, 1, r]`` of the forward call in progress, when it is fused
        _fused_freqs = None

        def _fusable(self, rotary_pos_emb, batch: int, others) -> bool:
            c = self.config
            no_rope = bool(c.no_rope_freq) and bool(c.no_rope_freq[self.layer_number - 1])
            return (
                isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.dim() == 4
                and rotary_pos_emb.shape[1] in (1, batch) and rotary_pos_emb.shape[2] == 1
                and all(v is None for v in others) and not InferenceMode.is_active()
                and c.qk_layernorm and not c.qk_l2_norm and c.normalization == "RMSNorm"
                and c.context_parallel_size == 1 and not no_rope
                and not (c.apply_rope_fusion or c.rotary_interleaved or c.multi_latent_attention
                         or c.fused_single_qkv_rope or c.flash_decode or c.test_mode)
                and self._yarn_concentration_factor in (None, 1.0)
                and _head_rms_norm(self.q_layernorm) is not None
                and _head_rms_norm(self.k_layernorm) is not None
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
            if freqs is None or not split_qkv:
                return super().get_query_key_value_tensors(
                    hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv)
            # megatron applies the norms here when they are set; detach them for this call only
            q_norm, k_norm = self.q_layernorm, self.k_layernorm
            self.q_layernorm = self.k_layernorm = None
            try:
                query, key, *rest = super().get_query_key_value_tensors(
                    hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv)
            finally:
                self.q_layernorm, self.k_layernorm = q_norm, k_norm
            cos, sin = rope_tables(freqs, query.dtype)
            query = qk_norm_rope(query, *_head_rms_norm(q_norm), cos, sin)
            key = qk_norm_rope(key, *_head_rms_norm(k_norm), cos, sin)
            return (query, key, *rest)

    return QKNormRoPESelfAttention
