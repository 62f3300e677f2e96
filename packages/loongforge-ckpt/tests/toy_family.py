"""A third-party model family for test_ckpt_third_party.py: the LLaMA architecture stored under
GPT-NeoX-like HF names (``transformer.h.N.attn.q.weight``...) with HF ``model_type``
``toy_llama``. It registers through the ordinary hook and declares its own weight mapping with
the core's rule classes; loongforge-ckpt knows nothing about it.
"""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import ModelFamily
from loongforge.weight_mapping import FusedGateUp, FusedQKV, Rename, VocabRows, WeightMapping
from loongforge_llm.common.args import to_plain_dict
from loongforge_llm.provider import LLMProvider

#: HF LLaMA name -> this family's HF name (used by the test to write its checkpoint)
RENAMES = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "head.weight",
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.out.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
}


def toy_name(llama_name: str) -> str:
    if llama_name in RENAMES:
        return RENAMES[llama_name]
    _, _, i, rest = llama_name.split(".", 3)  # model.layers.{i}.<rest>
    return f"transformer.h.{i}.{RENAMES[rest]}"


class ToyProvider(LLMProvider):
    """Builds the LLaMA model; maps weights with its own rules (untied embeddings only)."""

    def __init__(self, model_cfg, *, plugins=None):
        super().__init__({**to_plain_dict(model_cfg), "family": "llama"}, plugins=plugins)
        if self.args.tie_word_embeddings:
            raise ValueError("config key 'model.tie_word_embeddings': toy_llama has untied embeddings only")

    def weight_mapping(self) -> WeightMapping:
        a, h, o = self.args, "transformer.h.{i}", "decoder.layers.{i}"
        vocab = {"vocab_size": a.vocab_size, "padded_vocab_size": self.padded_vocab_size()}
        rules = [
            VocabRows(hf="transformer.wte.weight", ours="embedding.word_embeddings.weight", **vocab),
            Rename(hf=f"{h}.ln_1.weight", ours=f"{o}.input_layernorm.weight"),
            FusedQKV(hf_q=f"{h}.attn.q.weight", hf_k=f"{h}.attn.k.weight", hf_v=f"{h}.attn.v.weight",
                     ours=f"{o}.self_attention.linear_qkv.weight", num_heads=a.num_attention_heads,
                     num_query_groups=a.num_key_value_heads, head_dim=a.head_dim),
            Rename(hf=f"{h}.attn.out.weight", ours=f"{o}.self_attention.linear_proj.weight", tp_dim=1),
            Rename(hf=f"{h}.ln_2.weight", ours=f"{o}.pre_mlp_layernorm.weight"),
            FusedGateUp(hf_gate=f"{h}.mlp.w1.weight", hf_up=f"{h}.mlp.w3.weight", ours=f"{o}.mlp.linear_fc1.weight"),
            Rename(hf=f"{h}.mlp.w2.weight", ours=f"{o}.mlp.linear_fc2.weight", tp_dim=1),
            Rename(hf="transformer.ln_f.weight", ours="decoder.final_layernorm.weight", stage="head"),
            VocabRows(hf="head.weight", ours="output_layer.weight", stage="head", **vocab),
        ]
        return WeightMapping(rules, a.num_hidden_layers)

    def hf_config(self) -> dict:
        return {**super().hf_config(), "model_type": "toy_llama", "architectures": ["ToyLlamaForCausalLM"]}


@hookimpl
def loongforge_register_models():
    return [ModelFamily(name="toy_llama", builder="toy_family:ToyProvider", hf_model_types=("toy_llama",),
                        description="test: LLaMA under other HF names")]
