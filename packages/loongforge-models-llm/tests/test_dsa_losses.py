"""DSA indexer losses vs the definitions computed query by query; which parameters get gradients."""

from __future__ import annotations

import pytest
import torch
from loongforge.config import ConfigError
from loongforge_llm.dsa.losses import (
    DSAIndexerConfig,
    dense_attention_target,
    dense_indexer_loss,
    freeze_for_stage,
    indexer_loss,
    sparse_attention_target,
    sparse_indexer_loss,
)
from loongforge_llm.dsa.mla import DSAMLAttention, MLADims
from loongforge_llm.dsa.topk import allowed_mask, select_topk

B, S, H, D, K = 2, 10, 3, 8, 4


def _kl(p, q):
    return sum(float(pi) * float(torch.log(pi / qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _head_summed(q, k, scale, keys):
    """Definition: sum over heads of each head's softmax over `keys`, then L1 normalise."""
    p = torch.zeros(len(keys), dtype=q.dtype)
    for h in range(q.shape[0]):
        p += torch.softmax(torch.stack([q[h] @ k[t, h] for t in keys]) * scale, 0)
    return p / p.sum()


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g, dtype=torch.float64),
            torch.randn(B, S, H, D, generator=g, dtype=torch.float64),
            torch.randn(B, S, S, generator=g, dtype=torch.float64))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="dsa.stage"):
        DSAIndexerConfig(stage="warmup")
    with pytest.raises(ConfigError, match="dsa.index_topk"):
        DSAIndexerConfig(index_topk=0)
    with pytest.raises(ConfigError, match="dsa.loss_weight"):
        DSAIndexerConfig(loss_weight=-1.0)
    assert DSAIndexerConfig().detach_indexer_input and not DSAIndexerConfig("dense_warmup").detach_indexer_input


def test_dense_loss_matches_definition():
    q, k, scores = _tensors()
    seg = torch.tensor([[0] * 6 + [1] * 4, [0] * S])
    allowed = allowed_mask(S, S, segment_ids=seg).expand(B, S, S)
    got = dense_indexer_loss(scores, dense_attention_target(q, k, 0.3, allowed), allowed)
    total = 0.0
    for b in range(B):
        for s in range(S):
            keys = [t for t in range(S) if allowed[b, s, t]]
            total += _kl(_head_summed(q[b, s], k[b], 0.3, keys), torch.softmax(scores[b, s, keys], 0))
    assert got.item() == pytest.approx(total / (B * S), rel=1e-10)


def test_sparse_loss_matches_definition():
    q, k, scores = _tensors(1)
    idx = select_topk(scores, K)
    got = sparse_indexer_loss(scores, sparse_attention_target(q, k, 0.3, idx), idx)
    total = 0.0
    for b in range(B):
        for s in range(S):
            keys = [t for t in idx[b, s].tolist() if t >= 0]
            assert len(keys) == min(K, s + 1)
            total += _kl(_head_summed(q[b, s], k[b], 0.3, keys), torch.softmax(scores[b, s, keys], 0))
    assert got.item() == pytest.approx(total / (B * S), rel=1e-10)


def test_loss_is_zero_when_indexer_matches_target():
    q, k, scores = _tensors(2)
    idx = select_topk(scores, K)
    target = sparse_attention_target(q, k, 0.3, idx)
    ideal = torch.full_like(scores, -30.0).scatter_reduce(  # -1 slots write log(1e-300) to key 0: amax keeps real
        -1, idx.clamp(min=0), target.clamp_min(1e-300).log(), reduce="amax", include_self=False)
    assert sparse_indexer_loss(ideal, target, idx).item() == pytest.approx(0.0, abs=1e-12)
    assert sparse_indexer_loss(scores, target, idx).item() > 1e-3


def _layer():
    torch.manual_seed(0)
    layer = DSAMLAttention(MLADims(32, 4, 16, 16, 8, 8, 8, 4, 16, index_topk=4))
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return layer


def _grads(layer):
    return {n: p.grad for n, p in layer.named_parameters()}


def test_dense_warmup_trains_only_the_indexer():
    layer, cfg = _layer(), DSAIndexerConfig(stage="dense_warmup", index_topk=4, loss_weight=0.5)
    freeze_for_stage(layer, cfg)
    x = torch.randn(2, 12, 32)
    out, aux = layer(x, dense=True, detach_indexer_input=cfg.detach_indexer_input, return_aux=True)
    assert (aux["topk_indices"] >= 0).sum(-1).equal(torch.arange(1, 13).expand(2, 12))  # dense: every past key
    loss = indexer_loss(cfg, aux)
    assert not out.requires_grad  # frozen main path
    loss.backward()
    for name, g in _grads(layer).items():
        if name.startswith("indexer."):
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None, name
    cfg1 = DSAIndexerConfig(stage="dense_warmup", index_topk=4, loss_weight=1.0)
    assert indexer_loss(cfg1, aux).item() == pytest.approx(2 * loss.item(), rel=1e-6)


def test_sparse_stage_separates_lm_and_indexer_gradients():
    layer, cfg = _layer(), DSAIndexerConfig(stage="sparse", index_topk=4)
    freeze_for_stage(layer, cfg)
    x = torch.randn(2, 12, 32, requires_grad=True)
    out, aux = layer(x, detach_indexer_input=cfg.detach_indexer_input, return_aux=True)
    assert (aux["topk_indices"][:, -1] >= 0).sum(-1).eq(4).all()  # sparse: 4 of 12
    out.square().mean().backward(retain_graph=True)  # stands in for the LM loss
    lm = _grads(layer)
    assert all(g is None for n, g in lm.items() if n.startswith("indexer."))
    assert all(g is not None for n, g in lm.items() if not n.startswith("indexer."))
    layer.zero_grad(set_to_none=True)
    x.grad = None
    indexer_loss(cfg, aux).backward()
    ix = _grads(layer)
    assert all(g is None for n, g in ix.items() if not n.startswith("indexer."))
    assert all(g is not None and g.abs().sum() > 0 for n, g in ix.items() if n.startswith("indexer."))
    assert x.grad is None  # the indexer's input was detached


def test_sparse_loss_from_selected_scores_equals_full_scores_and_works_chunked():
    layer, cfg = _layer(), DSAIndexerConfig(stage="sparse", index_topk=4)
    x = torch.randn(2, 12, 32)
    _, aux = layer(x, detach_indexer_input=True, return_aux=True)
    idx = aux["topk_indices"]
    target = sparse_attention_target(aux["query"].detach(), aux["key"].detach(), aux["scale"], idx)
    full = sparse_indexer_loss(aux["index_scores"], target, idx)  # from the whole [B, S, T] scores
    assert indexer_loss(cfg, aux).item() == pytest.approx(full.item(), rel=1e-6)
    _, aux_c = layer(x, detach_indexer_input=True, chunk_size=5, return_aux=True)
    assert aux_c["index_scores"] is None and torch.equal(aux_c["topk_indices"], idx)
    g_full = torch.autograd.grad(full, layer.indexer.wq_b.weight)[0]
    g_chunk = torch.autograd.grad(indexer_loss(cfg, aux_c), layer.indexer.wq_b.weight)[0]
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="dense warm-up"):
        indexer_loss(DSAIndexerConfig(stage="dense_warmup"), aux_c)
