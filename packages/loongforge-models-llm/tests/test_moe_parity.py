"""Qwen3-MoE: logits parity with ``transformers.Qwen3MoeForCausalLM`` and expert weight layouts.

The tiny config is built twice from the same random weights: as the HF model (fp32, eager
attention) and as our ``GPTModel`` with megatron-core's ``MoELayer`` (``TopKRouter``, the
all-to-all or all-gather dispatcher, our ``GroupedExperts`` or megatron's ``SequentialMLP``). The
variants cover ``norm_topk_prob`` on and off (megatron's top-k-then-softmax vs softmax-then-top-k)
and a mix of dense and MoE layers (``mlp_only_layers``, ``decoder_sparse_step``). Weights come
both from the HF model's in-memory state dict (transformers 5: fused ``gate_up_proj`` [E, 2I, H])
and from its ``save_pretrained`` safetensors (per-expert tensors).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge.weight_mapping import safetensors_getter
from loongforge_llm.moe.provider import MoEProvider
from loongforge_llm.moe.weights import merge_expert_shards

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers (pytest imports tests by path)
from test_parity import hf_model  # noqa: E402

REL_TOL = 1e-5
SEQ = 48
VARIANTS = {
    "tiny": {},  # norm_topk_prob, every layer MoE, all-to-all dispatcher, GroupedExperts
    "no_norm_topk": {"norm_topk_prob": False},
    "mixed_layers": {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]},  # only layer 1 MoE
    "sequential_mlp": {"moe": {"grouped_gemm": False}},
    "allgather": {"moe": {"token_dispatcher": "allgather"}},
}


def section(load_size, **changes):
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(load_size("qwen3_moe", "qwen3_moe_tiny"))
    d.update(changes)
    return d


def build(provider, backend, get, run=None):
    run = run or RunSettings()
    model = provider.build(provider.transformer_config(run), run, backend=backend).eval()
    provider.load_hf_weights(model, get)
    return model


def rel_error(ours, hf, vocab):
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        logits, ref = ours(ids, pos, None), hf(ids).logits
    return ((logits[..., :vocab] - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(mcore, load_size, variant):
    provider = MoEProvider(section(load_size, **VARIANTS[variant]))
    hf = hf_model(provider)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    if variant == "mixed_layers":
        kinds = [type(layer.mlp).__name__ for layer in hf.model.layers]
        assert kinds == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeMLP"], kinds
    ours = build(provider, mcore, hf.state_dict().__getitem__)
    experts = [type(layer.mlp.experts).__name__ for layer in ours.decoder.layers if hasattr(layer.mlp, "experts")]
    assert experts and set(experts) == {"SequentialMLP" if variant == "sequential_mlp" else "GroupedExperts"}
    rel = rel_error(ours, hf, provider.args.vocab_size)
    print(f"\nqwen3_moe {variant}: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL


def test_saved_per_expert_checkpoint_loads_and_round_trips(mcore, load_size, tmp_path):
    """``save_pretrained`` writes one tensor per expert; loading it gives the same logits, and
    the export gives back exactly those tensors (and nothing else)."""
    provider = MoEProvider(section(load_size, num_hidden_layers=3, mlp_only_layers=[0]))
    hf = hf_model(provider, seed=3)
    hf.save_pretrained(tmp_path)
    get = safetensors_getter(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in saved and "model.layers.0.mlp.gate_proj.weight" in saved
    ours = build(provider, mcore, get)
    assert rel_error(ours, hf, provider.args.vocab_size) < REL_TOL
    back = provider.export_hf_weights(ours)
    assert sorted(back) == sorted(saved)
    for k, t in saved.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert provider.weight_mapping().unmapped_hf(saved) == []


@pytest.mark.parametrize(("ep", "etp"), [(2, 1), (4, 1), (2, 2), (1, 2)])
def test_expert_parallel_ranks_read_only_their_experts(load_size, ep, etp):
    """Each EP rank's mapping asks only for its own experts' HF tensors; the EP x ETP parts put
    back together (``merge_expert_shards``) equal the full (EP=1) expert weights."""
    provider = MoEProvider(section(load_size))
    sd = hf_model(provider, seed=5).state_dict()
    from loongforge_llm.moe.weights import per_expert_getter

    get = per_expert_getter(sd.__getitem__)
    full = provider.weight_mapping().hf_to_ours(get)
    experts = provider.moe.num_experts
    parts = {}
    for ep_rank in range(ep):
        for etp_rank in range(etp):
            mapping = provider.weight_mapping(ep_rank=ep_rank, ep_size=ep, etp_rank=etp_rank, etp_size=etp)
            wanted = {n.split(".experts.")[1].split(".")[0] for n in mapping.hf_names() if ".experts." in n}
            mine = experts // ep
            assert wanted == {str(e) for e in range(ep_rank * mine, (ep_rank + 1) * mine)}
            parts[ep_rank, etp_rank] = mapping.hf_to_ours(get)
    for name in full:
        if ".experts." not in name:
            assert all(torch.equal(p[name], full[name]) for p in parts.values()), name
            continue
        shards = [[parts[r, t][name] for t in range(etp)] for r in range(ep)]
        assert shards[0][0].shape[0] == experts // ep
        assert torch.equal(merge_expert_shards(name, shards), full[name]), name
