"""LLMProvider: building, training step, recompute, vocab padding and config errors."""

from __future__ import annotations

from pathlib import Path

import loongforge_llm
import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge.weight_mapping import TE_NORM_NAMES
from loongforge_llm.common.args import ModelConfigError
from loongforge_llm.families import FAMILIES
from loongforge_llm.provider import LLMProvider, provider_for


def build(provider, backend, run=None):
    run = run or RunSettings()
    return provider.build(provider.transformer_config(run), run, backend=backend)


def test_padded_vocab(load_size):
    p = LLMProvider(load_size("qwen3", "qwen3_tiny"))
    assert p.padded_vocab_size(RunSettings()) == 384
    assert p.padded_vocab_size(RunSettings(tp=2)) == 512
    assert p.padded_vocab_size(RunSettings(tp=4, make_vocab_size_divisible_by=1)) == 300
    assert LLMProvider(load_size("qwen3", "qwen3_0.6b")).padded_vocab_size(RunSettings(tp=8)) == 152576


@pytest.mark.parametrize("group,name", [("qwen3", "qwen3_tiny"), ("qwen2_5", "qwen2.5_tiny"), ("llama3", "llama3_tiny")])
def test_built_parameter_count_matches_config(mcore, load_size, group, name):
    p = LLMProvider(load_size(group, name))
    model = build(p, mcore)
    assert sum(t.numel() for t in model.parameters()) == p.num_parameters(padded=RunSettings())
    assert sorted(n for n, _ in model.named_parameters()) == sorted(p.weight_mapping().ours_names())


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_training_step_with_recompute(mcore, load_size, recompute):
    p = LLMProvider(load_size("qwen3", "qwen3_tiny"))
    run = RunSettings(recompute_granularity=recompute, recompute_method="uniform" if recompute == "full" else None,
                      recompute_num_layers=1 if recompute == "full" else None)
    model = build(p, mcore, run).train()
    ids = torch.randint(0, 300, (2, 16))
    loss = model(ids, torch.arange(16).expand(2, 16), None, labels=torch.roll(ids, -1, 1))
    assert loss.shape == (2, 16)
    loss.mean().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in model.parameters())


def test_bf16_build(mcore, load_size):
    """bf16 linears from params_dtype; the trainer's Float16Module casts the rest (norms)."""
    from megatron.core.transformer.module import Float16Module

    p = LLMProvider(load_size("llama3", "llama3_tiny"))
    run = RunSettings(bf16=True)
    config = p.transformer_config(run)
    model = p.build(config, run, backend=mcore)
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.dtype == torch.bfloat16
    wrapped = Float16Module(config, model)
    assert {q.dtype for q in wrapped.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = wrapped(torch.randint(0, 300, (1, 8)), torch.arange(8)[None], None)
    assert torch.isfinite(out.float()).all()


def test_te_spec_names(load_size):
    m = LLMProvider(load_size("qwen2", "qwen2_tiny")).weight_mapping()
    te = m.matching(["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"])
    names = set(te.ours_names())
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in names
    assert not any(n.endswith("input_layernorm.weight") for n in names)
    assert len(TE_NORM_NAMES) == 2


def test_mimo_is_experimental_but_maps(mcore, load_size):
    p = LLMProvider(load_size("mimo", "mimo_tiny"))
    assert not p.family.supported and p.family.hf_reference is None
    m = p.weight_mapping()
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in m.ours_names()
    assert m.unmapped_hf(["model.mtp_layers.0.token_layernorm.weight", "model.layers.0.mlp.up_proj.weight"]) == []
    model = build(p, mcore)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (300, 64), "lm_head.weight": (300, 64), "model.norm.weight": (64,)}
    for i in range(2):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in {
            "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
            "self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64), "self_attn.v_proj.weight": (32, 64),
            "self_attn.q_proj.bias": (64,), "self_attn.k_proj.bias": (32,), "self_attn.v_proj.bias": (32,),
            "self_attn.o_proj.weight": (64, 64), "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64),
            "mlp.down_proj.weight": (64, 128)}.items()}
    sd = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    p.load_hf_weights(model, sd.__getitem__)
    back = p.export_hf_weights(model)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert p.hf_config()["architectures"] == ["MiMoForCausalLM"]


def test_load_reports_shape_mismatch(mcore, load_size):
    p = LLMProvider(load_size("llama2", "llama2_tiny"))
    model = build(p, mcore)
    sd = p.export_hf_weights(model)
    sd["model.layers.1.mlp.gate_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    with pytest.raises(ValueError, match=r"'decoder\.layers\.1\.mlp\.linear_fc1\.weight': expected shape \(256, 64\), got \(192, 64\)"):
        p.load_hf_weights(model, sd.__getitem__)
    del sd["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(KeyError, match="q_proj"):
        p.load_hf_weights(model, sd.__getitem__)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"num_hidden_layers": None}, r"'model\.num_hidden_layers'"),
        ({"hidden_act": "gelu"}, r"'model\.hidden_act'.*silu"),
        ({"num_key_value_heads": 3}, r"'model\.num_key_value_heads' \(3\) must divide"),
        ({"attention_bias": True}, r"'model\.attention_bias'.*llama"),
        ({"family": "gpt9"}, r"'model\.family'.*gpt9.*llama"),
        ({"hidden_size": 63, "head_dim": None}, r"'model\.head_dim' is required"),
        ({"fusions": "maybe"}, r"'model\.fusions'"),
    ],
)
def test_config_errors_name_the_key(load_size, change, match):
    cfg = {**dict(load_size("llama2", "llama2_tiny")), **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ModelConfigError, match=match):
        LLMProvider(cfg).transformer_config(RunSettings())


def test_parallel_layout_errors_are_explained(load_size):
    p = LLMProvider(load_size("qwen2_5", "qwen2.5_tiny"))
    with pytest.raises(ModelConfigError, match=r"tp=8"):
        p.transformer_config(RunSettings(tp=8))


def test_every_family_has_mapping_rules(load_size):
    for f in FAMILIES.values():
        group = f.config_groups[0]
        tiny = next((Path(loongforge_llm.__file__).parent / "configs" / "models" / group).glob("*_tiny.yaml")).stem
        p = provider_for(load_size(group, tiny))  # the family's provider class (MoE families: MoEProvider)
        assert p.family is f and p.weight_mapping().rules


def test_padded_vocab_rows_stay_out_of_the_loss(mcore, load_size):
    """Padding 300 -> 384 rows changes neither the loss nor the real rows' gradients."""
    p = LLMProvider(load_size("llama3", "llama3_tiny"))
    exact = build(p, mcore, RunSettings(make_vocab_size_divisible_by=1))
    padded = build(p, mcore, RunSettings(make_vocab_size_divisible_by=128))
    assert padded.real_vocab_size == 300 and exact.real_vocab_size is None
    with torch.no_grad():
        for (name, ours), (_, theirs) in zip(padded.named_parameters(), exact.named_parameters(), strict=True):
            ours.zero_()[: theirs.shape[0]].copy_(theirs) if "embedding" in name or "output_layer" in name \
                else ours.copy_(theirs)
    ids = torch.randint(0, 300, (2, 16))
    losses = [m(ids, torch.arange(16).expand(2, 16), None, labels=torch.roll(ids, -1, 1)) for m in (exact, padded)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for loss in losses:
        loss.mean().backward()
    emb = [m.embedding.word_embeddings.weight.grad for m in (exact, padded)]
    torch.testing.assert_close(emb[1][:300], emb[0], rtol=1e-5, atol=1e-7)
    assert not emb[1][300:].any()
