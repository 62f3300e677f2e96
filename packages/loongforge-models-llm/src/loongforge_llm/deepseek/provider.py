"""``DeepseekV3Provider``: MLA attention config and spec on top of :class:`MoEProvider`."""

from __future__ import annotations

from typing import Any

from loongforge.model_provider import RunSettings

from loongforge_llm.moe.provider import MoEProvider


class DeepseekV3Provider(MoEProvider):
    def config_class(self) -> type:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig

    def extra_config_fields(self, run: RunSettings) -> dict[str, Any]:
        from loongforge_llm.deepseek.routing import v3_moe_fields

        s, m = self._section, self.moe
        fields = super().extra_config_fields(run)  # EP/ETP, dispatcher, capacity...
        fields.update(v3_moe_fields(s, bias_update_rate=m.options.bias_update_rate))
        fields.update(
            moe_layer_freq=[int(x) for x in m.moe_layers],
            multi_latent_attention=True,
            q_lora_rank=s.get("q_lora_rank"),
            kv_lora_rank=s["kv_lora_rank"],
            qk_head_dim=s["qk_nope_head_dim"],
            qk_pos_emb_head_dim=s["qk_rope_head_dim"],
            v_head_dim=s["v_head_dim"],
            kv_channels=s["qk_nope_head_dim"] + s["qk_rope_head_dim"],
            rope_type="rope",
            rotary_base=self.args.rope_theta,
            rotary_scaling_factor=1.0,
            # megatron's MLA always applies RoPE as HF's rope_interleave=true does (deepseek.weights)
            qk_layernorm=True,
        )
        return fields

    def layer_spec(self, config, backend: Any, vp_stage: int | None = None) -> Any:
        import dataclasses

        from loongforge.registry import load_object
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from loongforge_llm.deepseek.attention import MLASDPAttention
        from loongforge_llm.moe.spec import moe_decoder_spec

        spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True, normalization="RMSNorm")
        attn = spec.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=MLASDPAttention))
        dense = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))
        mlp = load_object(self.family.moe_mlp)(config, self.moe)
        return moe_decoder_spec(dense, config, self.moe.moe_layers, mlp, vp_stage=vp_stage)

    def weight_mapping(self, run=None, *, ep_rank=0, ep_size=1, etp_rank=0, etp_size=1):
        from loongforge.registry import load_object
        from loongforge.weight_mapping import WeightMapping

        rules = load_object(self.family.rules)(self.args, self.moe, self.padded_vocab_size(run), section=self._section,
                                               ep_rank=ep_rank, ep_size=ep_size, etp_rank=etp_rank, etp_size=etp_size)
        return WeightMapping(rules, self.args.num_hidden_layers, ignore_hf=self.family.ignore_hf)

    # --- the routers' correction bias is a buffer, not a parameter --------------------------------
    def _bias_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"

    def load_hf_weights(self, model, get_hf_tensor, **kwargs) -> None:
        import torch

        super().load_hf_weights(model, get_hf_tensor, **kwargs)
        inner = model
        while hasattr(inner, "module"):
            inner = inner.module
        with torch.no_grad():
            for layer in inner.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is not None and router.expert_bias is not None:
                    router.expert_bias.copy_(get_hf_tensor(self._bias_name(layer.layer_number - 1)))

    def export_hf_weights(self, model, run=None):
        out = super().export_hf_weights(model, run)
        inner = model
        while hasattr(inner, "module"):
            inner = inner.module
        for layer in inner.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None and router.expert_bias is not None:
                out[self._bias_name(layer.layer_number - 1)] = router.expert_bias.detach().clone()
        return out
