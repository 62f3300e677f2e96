"""Logits parity with HF transformers and bit-exact HF -> ours -> HF weight round trips.

For every family with an HF reference class, the tiny config of each config group is built twice
from the same random weights: as the ``transformers`` model (fp32, eager attention) and as our
megatron-core ``GPTModel`` loaded through ``WeightMapping.hf_to_ours``. The variants cover MHA and
GQA (down to one KV head), q/k/v biases, QK-norm with head_dim != hidden/heads, llama3 RoPE scaling
with a non-default ``original_max_position_embeddings``, and tied and untied embeddings.
"""

from __future__ import annotations

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge.registry import load_object
from loongforge_llm.provider import LLMProvider

PARITY = [
    ("llama2", "llama2_tiny"),  # MHA, untied, plain RoPE
    ("llama3", "llama3_tiny"),  # GQA, tied, llama3 RoPE scaling
    ("qwen1_5", "qwen1.5_tiny"),  # MHA + q/k/v bias, untied
    ("qwen2", "qwen2_tiny"),  # GQA + q/k/v bias, tied
    ("qwen2_5", "qwen2.5_tiny"),  # one KV head + q/k/v bias, untied
    ("qwen3", "qwen3_tiny"),  # QK-norm, head_dim 32 with hidden 64 / 4 heads, tied
]
REL_TOL = 1e-5
SEQ = 48


def hf_model(provider: LLMProvider, seed: int = 0):
    """The HF reference model of ``provider``'s config with random weights (norms around 1,
    biases non-zero) in fp32."""
    import transformers

    cfg = dict(provider.hf_config())
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model.eval()


def ours_from_hf(provider: LLMProvider, hf, backend, run: RunSettings | None = None):
    run = run or RunSettings()
    model = provider.build(provider.transformer_config(run), run, backend=backend).eval()
    provider.load_hf_weights(model, hf.state_dict().__getitem__)
    return model


@pytest.mark.parametrize("group,name", PARITY)
def test_logits_match_hf(mcore, load_size, group, name):
    provider = LLMProvider(load_size(group, name))
    ref_cls = load_object(provider.family.hf_reference)
    hf = hf_model(provider)
    assert type(hf) is ref_cls
    ours = ours_from_hf(provider, hf, mcore)
    vocab = provider.args.vocab_size
    assert provider.padded_vocab_size(RunSettings()) > vocab  # the padded rows are exercised
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        logits = ours(ids, pos, None)
        ref = hf(ids).logits
    assert logits.shape == (2, SEQ, provider.padded_vocab_size(RunSettings()))
    rel = ((logits[..., :vocab] - ref).norm() / ref.norm()).item()
    print(f"\nparity {name}: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL, f"{name}: relative logits error {rel:.3e} >= {REL_TOL}"


@pytest.mark.parametrize("group,name", PARITY)
def test_hf_round_trip_bit_identical(mcore, load_size, group, name):
    provider = LLMProvider(load_size(group, name))
    hf = hf_model(provider, seed=3)
    ours = ours_from_hf(provider, hf, mcore)
    back = provider.export_hf_weights(ours)
    sd = hf.state_dict()
    expected = [k for k in sd if not (provider.args.tie_word_embeddings and k == "lm_head.weight")]
    assert sorted(back) == sorted(expected)
    for k in expected:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    assert provider.weight_mapping().unmapped_hf(sd) == (["lm_head.weight"] if provider.args.tie_word_embeddings else [])


@pytest.mark.parametrize("group,name", PARITY)
def test_tp_shards_merge_to_full(load_size, group, name):
    provider = LLMProvider(load_size(group, name))
    run = RunSettings(tp=2)
    mapping = provider.weight_mapping(run)
    sd = hf_model(provider, seed=5).state_dict()
    if provider.args.num_key_value_heads % 2:
        with pytest.raises(ValueError, match="num_query_groups"):
            mapping.hf_to_ours(sd.__getitem__, 0, 2)
        return
    full = mapping.hf_to_ours(sd.__getitem__)
    shards = [mapping.hf_to_ours(sd.__getitem__, r, 2) for r in range(2)]
    for n, t in full.items():
        assert torch.equal(mapping.merge_tp(n, [s[n] for s in shards]), t), n
