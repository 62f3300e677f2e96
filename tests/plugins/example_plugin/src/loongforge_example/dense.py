"""A family of our own on loongforge_llm's dense provider: the LLaMA layout with per-head QK-norm
(as Qwen3 computes it), its HF checkpoints using Qwen3's tensor names. No provider code."""

from loongforge_llm.dense import DenseFamily, dense_family_record, dense_provider

FAMILY = DenseFamily(
    name="example_dense",
    hf_model_types=("example_dense",),
    hf_model_type="example_dense",
    hf_architecture="ExampleDenseForCausalLM",
    config_groups=("example_dense",),
    rules="loongforge_example.dense:rules",
    qkv_bias=False,
    qk_norm=True,
    description="example third-party family on the shipped dense provider",
)
Provider = dense_provider(FAMILY)
RECORD = dense_family_record(FAMILY, "loongforge_example.dense:Provider")


def rules(args, padded_vocab_size):
    """The dense rules plus the QK-norm weights."""
    from loongforge.weight_mapping import Rename
    from loongforge_llm.common.weights import dense_rules

    attn = "decoder.layers.{i}.self_attention"
    return [
        *dense_rules(args, padded_vocab_size),
        Rename(hf="model.layers.{i}.self_attn.q_norm.weight", ours=f"{attn}.q_layernorm.weight"),
        Rename(hf="model.layers.{i}.self_attn.k_norm.weight", ours=f"{attn}.k_layernorm.weight"),
    ]
