"""Weight rules of the dense decoder layout shared by the families (HF LLaMA-style names ->
megatron-core ``GPTModel`` with the local layer spec)."""

from __future__ import annotations

from loongforge.weight_mapping import FusedGateUp, FusedQKV, Rename, Rule, TiedOutput, VocabRows

from loongforge_llm.common.args import DenseArgs

HF_LAYER = "model.layers.{i}"
OURS_LAYER = "decoder.layers.{i}"


def _qkv(args: DenseArgs, kind: str) -> FusedQKV:
    return FusedQKV(
        hf_q=f"{HF_LAYER}.self_attn.q_proj.{kind}",
        hf_k=f"{HF_LAYER}.self_attn.k_proj.{kind}",
        hf_v=f"{HF_LAYER}.self_attn.v_proj.{kind}",
        ours=f"{OURS_LAYER}.self_attention.linear_qkv.{kind}",
        num_heads=args.num_attention_heads,
        num_query_groups=args.num_key_value_heads,
        head_dim=args.head_dim,
    )


def qkv_bias_rule(args: DenseArgs) -> FusedQKV:
    """The fused q/k/v bias (Qwen2-style attention)."""
    return _qkv(args, "bias")


def dense_rules(args: DenseArgs, padded_vocab_size: int) -> list[Rule]:
    """Embedding, per-layer attention/MLP/norms, final norm and (tied or separate) output layer."""
    vocab = {"vocab_size": args.vocab_size, "padded_vocab_size": padded_vocab_size}
    rules: list[Rule] = [
        VocabRows(hf="model.embed_tokens.weight", ours="embedding.word_embeddings.weight", **vocab),
        Rename(hf=f"{HF_LAYER}.input_layernorm.weight", ours=f"{OURS_LAYER}.input_layernorm.weight"),
        _qkv(args, "weight"),
        Rename(hf=f"{HF_LAYER}.self_attn.o_proj.weight", ours=f"{OURS_LAYER}.self_attention.linear_proj.weight", tp_dim=1),
        Rename(hf=f"{HF_LAYER}.post_attention_layernorm.weight", ours=f"{OURS_LAYER}.pre_mlp_layernorm.weight"),
        FusedGateUp(
            hf_gate=f"{HF_LAYER}.mlp.gate_proj.weight",
            hf_up=f"{HF_LAYER}.mlp.up_proj.weight",
            ours=f"{OURS_LAYER}.mlp.linear_fc1.weight",
        ),
        Rename(hf=f"{HF_LAYER}.mlp.down_proj.weight", ours=f"{OURS_LAYER}.mlp.linear_fc2.weight", tp_dim=1),
        Rename(hf="model.norm.weight", ours="decoder.final_layernorm.weight", stage="head"),
    ]
    if args.tie_word_embeddings:
        rules.append(TiedOutput(hf="model.embed_tokens.weight", ours="output_layer.weight", **vocab))
    else:
        rules.append(VocabRows(hf="lm_head.weight", ours="output_layer.weight", stage="head", **vocab))
    return rules
