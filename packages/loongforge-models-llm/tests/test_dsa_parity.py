"""DSA pieces vs transformers' DeepseekV32Attention (tiny random config, fp32 CPU, top-k < S)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v32")
from loongforge_llm.dsa.indexer import rope_cos_sin  # noqa: E402
from loongforge_llm.dsa.mla import DSAMLAttention, MLADims  # noqa: E402
from transformers import DeepseekV32Config  # noqa: E402
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf  # noqa: E402

S, TOPK = 24, 6


def _config(**kw):
    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, index_n_heads=4, index_head_dim=16,
                index_topk=TOPK, num_hidden_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    cfg = DeepseekV32Config(**base)
    cfg._attn_implementation = "eager"
    return cfg


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = _config(**kw)
    ref = hf.DeepseekV32Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():  # norms too: not the identity
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    ours = DSAMLAttention(MLADims.from_hf(cfg))
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return cfg, ref, ours


def _hf_forward(cfg, ref, x, captured):
    b, s, _ = x.shape
    pos = torch.arange(s).expand(b, s)
    cos, sin = hf.DeepseekV32RotaryEmbedding(cfg)(x, pos)
    mask = torch.full((s, s), torch.finfo(x.dtype).min).triu(1).expand(b, 1, s, s)
    hook = ref.indexer.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        out, _ = ref(x, (cos, sin), mask, position_ids=pos)
    finally:
        hook.remove()
    return out


def test_rope_tables_match_hf():
    cfg = _config()
    pos = torch.arange(S)[None]
    cos, sin = hf.DeepseekV32RotaryEmbedding(cfg)(torch.zeros(1, S, 8), pos)
    ours = rope_cos_sin(pos, cfg.qk_rope_head_dim)
    torch.testing.assert_close(ours[0], cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
def test_attention_output_and_indices_match_hf(absorbed):
    cfg, ref, ours = _pair()
    x = torch.randn(2, S, cfg.hidden_size)
    captured = []
    with torch.no_grad():
        expected = _hf_forward(cfg, ref, x, captured)
        got, aux = ours(x, absorbed=absorbed, return_aux=True)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, f"rel err {rel:.3e}"

    hf_idx, our_idx = captured[0].long(), aux["topk_indices"]
    assert our_idx.shape == hf_idx.shape == (2, S, TOPK)
    q_pos = torch.arange(S)[None, :, None]
    # HF fills the slots of a query with fewer than TOPK past keys with (masked) future keys; ours with -1.
    assert torch.equal((our_idx >= 0).sum(-1), (hf_idx <= q_pos).sum(-1))
    for b in range(2):
        for s in range(S):
            mine = sorted(i for i in our_idx[b, s].tolist() if i >= 0)
            theirs = sorted(i for i in hf_idx[b, s].tolist() if i <= s)
            assert mine == theirs, (b, s, mine, theirs)
    # sparsity is real: late queries see TOPK of their s+1 keys
    assert (our_idx[:, -1] >= 0).sum(-1).eq(TOPK).all() and S > 2 * TOPK


def test_sparse_attention_differs_from_dense():
    """The selection matters: with top-k >= S the same weights give a different (dense) output."""
    cfg, ref, ours = _pair()
    x = torch.randn(1, S, cfg.hidden_size)
    dense = DSAMLAttention(MLADims.from_hf(_config(index_topk=S)))
    dense.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert not torch.allclose(ours(x), dense(x), rtol=1e-3, atol=1e-4)
        assert torch.allclose(ours(x[:, :TOPK]), dense(x[:, :TOPK]), rtol=1e-5, atol=1e-6)


def test_chunked_path_matches_whole():
    _, _, ours = _pair(seed=1)
    x = torch.randn(2, S, ours.d.hidden_size)
    with torch.no_grad():
        whole = ours(x, absorbed=True)
        chunked = ours(x, absorbed=True, chunk_size=5)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
